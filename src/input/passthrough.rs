//! `output.passthrough_columns`: input columns copied unchanged to each
//! record's output row, with their Arrow types (Parquet: the file's types,
//! nested included; JSONL: the types arrow-json infers from the first
//! lines). Each record carries its cells as a one-row batch.

use crate::{Error, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::{Field, Schema, SchemaRef};
use serde_json::{Map, Value};
use std::io::BufRead;
use std::path::Path;

/// Lines read to infer the JSONL columns' types.
const INFER_LINES: usize = 1000;

/// The output fields of the passthrough columns: the input's types, every
/// field nullable (a record that could not be read has nulls there).
pub fn output_schema<'a>(fields: impl Iterator<Item = &'a Field>) -> SchemaRef {
    let fields: Vec<Field> = fields.map(|f| f.clone().with_nullable(true)).collect();
    std::sync::Arc::new(Schema::new(fields))
}

/// Fails naming the first passthrough column that `has` lacks.
pub fn check(file: &Path, names: &[String], has: impl Fn(&str) -> bool) -> Result<()> {
    match names.iter().find(|c| !has(c)) {
        Some(c) => Err(Error::Input(format!(
            "{}: output.passthrough_columns names `{c}`, which the input does not have",
            file.display()
        ))),
        None => Ok(()),
    }
}

/// JSONL passthrough: the types inferred from the first lines, and a
/// decoder that turns a record's cells into a one-row batch of them.
pub struct JsonColumns {
    names: Vec<String>,
    schema: SchemaRef,
    decoder: arrow::json::reader::Decoder,
}

impl JsonColumns {
    /// Infers the columns' types from the first lines of `path`; a column
    /// that none of them holds is an error naming it.
    pub fn infer(path: &Path, names: &[String]) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut values = Vec::new();
        for line in std::io::BufReader::new(file).lines().take(INFER_LINES) {
            let line = line.map_err(|e| Error::io(path, e))?;
            if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(&line) {
                values.push(Value::Object(pick(&obj, names)));
            }
        }
        let inferred = arrow::json::reader::infer_json_schema_from_iterator(values.iter().map(Ok))
            .map_err(|e| Error::Input(format!("{}: passthrough columns: {e}", path.display())))?;
        check(path, names, |c| inferred.field_with_name(c).is_ok())?;
        let fields: Vec<&Field> = names
            .iter()
            .map(|n| inferred.field_with_name(n).expect("checked"))
            .collect();
        let schema = output_schema(fields.into_iter());
        let decoder = arrow::json::ReaderBuilder::new(schema.clone())
            .build_decoder()
            .map_err(|e| Error::Input(format!("{}: passthrough columns: {e}", path.display())))?;
        Ok(Self {
            names: names.to_vec(),
            schema,
            decoder,
        })
    }

    /// The output fields.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// A record's cells as a one-row batch; a cell that does not fit the
    /// inferred type is the record's error.
    pub fn row(&mut self, obj: &Map<String, Value>) -> std::result::Result<RecordBatch, String> {
        let cells = pick(obj, &self.names);
        let fail = |e: arrow::error::ArrowError| {
            format!("passthrough columns do not match the types of the first lines ({e})")
        };
        self.decoder.serialize(&[cells]).map_err(fail)?;
        match self.decoder.flush().map_err(fail)? {
            Some(b) => Ok(b),
            None => Err("passthrough columns: no row decoded".into()),
        }
    }
}

/// The named cells of a row (absent ones left out: they decode as null).
fn pick(obj: &Map<String, Value>, names: &[String]) -> Map<String, Value> {
    names
        .iter()
        .filter_map(|n| obj.get(n).map(|v| (n.clone(), v.clone())))
        .collect()
}
