//! Parquet input, read batch by batch. Only the columns the job uses are
//! read and converted (to JSON values, so both formats share one record
//! builder).

use super::{InputRecord, RecordBuilder, OVERRIDE_COLUMNS};
use crate::{Error, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
};
use arrow::datatypes::{UInt16Type, UInt32Type, UInt64Type, UInt8Type};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A streaming Parquet reader.
pub struct ParquetSource {
    path: PathBuf,
    reader: ParquetRecordBatchReader,
    builder: RecordBuilder,
    columns: Vec<String>,
    batch: Option<RecordBatch>,
    pos: usize,
    row: u64,
    /// The passthrough columns' output fields, and their indices in a batch.
    passthrough: Option<(arrow::datatypes::SchemaRef, Vec<usize>)>,
}

impl ParquetSource {
    /// Opens a Parquet file; fails when neither the prompt nor the messages
    /// column exists.
    pub fn open(path: &Path, builder: RecordBuilder) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let b = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| {
            Error::Input(format!(
                "{}: not a readable Parquet file: {e}",
                path.display()
            ))
        })?;
        let schema = b.schema().clone();
        let has = |c: &str| schema.field_with_name(c).is_ok();
        let spec = &builder.spec;
        builder.check_template(path, has)?;
        super::passthrough::check(path, &spec.passthrough, has)?;
        if spec.template.is_none() && !has(&spec.prompt_column) && !has(&spec.messages_column) {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Error::Input(format!(
                "{}: neither input.prompt_column `{}` nor input.messages_column `{}` is a column (columns: {})",
                path.display(),
                spec.prompt_column,
                spec.messages_column,
                names.join(", ")
            )));
        }
        let mut columns: Vec<String> = vec![
            spec.id_column.clone(),
            spec.prompt_column.clone(),
            spec.messages_column.clone(),
            spec.system_column.clone(),
            spec.reference_column.clone(),
            spec.continuation_column.clone(),
        ];
        columns.extend(OVERRIDE_COLUMNS.iter().map(|c| c.to_string()));
        columns.push(super::SCHEMA_COLUMN.to_string());
        columns.extend(builder.template_columns().iter().cloned());
        columns.retain(|c| has(c));
        let mut read = columns.clone();
        read.extend(spec.passthrough.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        columns.retain(|c| seen.insert(c.clone()));
        // Read only those columns: datasets often carry many others.
        let roots: Vec<usize> = read
            .iter()
            .filter_map(|c| schema.index_of(c).ok())
            .collect();
        // The projected batch keeps the file's column order.
        let mut kept = roots.clone();
        kept.sort_unstable();
        kept.dedup();
        let passthrough = (!spec.passthrough.is_empty()).then(|| {
            let at = |c: &String| {
                let i = schema.index_of(c).expect("checked");
                kept.iter().position(|&k| k == i).expect("projected")
            };
            let fields = spec
                .passthrough
                .iter()
                .map(|c| schema.field_with_name(c).expect("checked"));
            (
                super::passthrough::output_schema(fields),
                spec.passthrough.iter().map(at).collect(),
            )
        });
        let mask = ProjectionMask::roots(b.parquet_schema(), roots);
        let reader = b
            .with_projection(mask)
            .with_batch_size(1024)
            .build()
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader,
            builder,
            columns,
            batch: None,
            pos: 0,
            row: 0,
            passthrough,
        })
    }
}

impl super::RecordSource for ParquetSource {
    fn passthrough_schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        self.passthrough.as_ref().map(|p| p.0.clone())
    }

    fn has_schema_column(&self) -> bool {
        self.columns.iter().any(|c| c == super::SCHEMA_COLUMN)
    }
}

impl Iterator for ParquetSource {
    type Item = Result<InputRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(b) = &self.batch {
                if self.pos < b.num_rows() {
                    let mut obj = Map::new();
                    for c in &self.columns {
                        if let Some(col) = b.column_by_name(c) {
                            obj.insert(c.clone(), to_json(col, self.pos));
                        }
                    }
                    let mut rec = self.builder.build(self.row, &obj);
                    if let Some((_, idx)) = &self.passthrough {
                        match b.project(idx) {
                            Ok(cells) => rec.passthrough = Some(cells.slice(self.pos, 1)),
                            Err(e) => {
                                return Some(Err(Error::Input(format!(
                                    "{}: {e}",
                                    self.path.display()
                                ))))
                            }
                        }
                    }
                    self.pos += 1;
                    self.row += 1;
                    return Some(Ok(rec));
                }
            }
            match self.reader.next()? {
                Ok(b) => {
                    self.batch = Some(b);
                    self.pos = 0;
                }
                Err(e) => {
                    return Some(Err(Error::Input(format!(
                        "{}: failed reading rows after row {}: {e}",
                        self.path.display(),
                        self.row
                    ))))
                }
            }
        }
    }
}

/// A binary cell: its text when it is UTF-8.
fn bytes(b: &[u8]) -> Value {
    match std::str::from_utf8(b) {
        Ok(s) => Value::String(s.to_string()),
        Err(_) => unsupported("binary that is not UTF-8"),
    }
}

/// A cell with no JSON meaning: an object, so that the record builder
/// reports a type error for it where a string or number is expected.
fn unsupported(what: &str) -> Value {
    let mut m = Map::new();
    m.insert("arrow_type".into(), Value::String(what.to_string()));
    Value::Object(m)
}

/// A float cell: NaN and infinities are no JSON number, so they become a
/// described value that every column's check refuses by name (never a
/// null, which would silently mean "use the job default").
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or_else(
        || serde_json::json!({ "arrow_type": format!("a non-finite float ({x})") }),
        Value::Number,
    )
}

/// One cell as JSON.
pub fn to_json(a: &ArrayRef, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    macro_rules! num {
        ($t:ty) => {
            Value::from(a.as_primitive::<$t>().value(i))
        };
    }
    match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => num!(Int8Type),
        DataType::Int16 => num!(Int16Type),
        DataType::Int32 => num!(Int32Type),
        DataType::Int64 => num!(Int64Type),
        DataType::UInt8 => num!(UInt8Type),
        DataType::UInt16 => num!(UInt16Type),
        DataType::UInt32 => num!(UInt32Type),
        DataType::UInt64 => num!(UInt64Type),
        DataType::Float32 => float(a.as_primitive::<Float32Type>().value(i) as f64),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::List(_) => {
            let l = a.as_list::<i32>().value(i);
            Value::Array((0..l.len()).map(|j| to_json(&l, j)).collect())
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>().value(i);
            Value::Array((0..l.len()).map(|j| to_json(&l, j)).collect())
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), to_json(col, i));
            }
            Value::Object(m)
        }
        DataType::Binary => bytes(a.as_binary::<i32>().value(i)),
        DataType::LargeBinary => bytes(a.as_binary::<i64>().value(i)),
        other => unsupported(&other.to_string()),
    }
}
