//! JSONL input: one JSON object per line, read line by line. Blank lines are
//! skipped; a line that is not valid UTF-8 or not a JSON object becomes an
//! error record.

use super::{InputRecord, RecordBuilder};
use crate::{Error, Result};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// A streaming JSONL reader.
pub struct JsonlSource {
    path: PathBuf,
    reader: BufReader<std::fs::File>,
    builder: RecordBuilder,
    line: u64,
    row: u64,
    buf: Vec<u8>,
    passthrough: Option<super::passthrough::JsonColumns>,
    /// The first record has a `json_schema` key.
    schema_column: bool,
}

impl JsonlSource {
    /// Opens a JSONL file. With a template, its first record must have
    /// every column the template reads (a later record without one becomes
    /// an error row).
    pub fn open(path: &Path, builder: RecordBuilder) -> Result<Self> {
        let first = first_object(path)?;
        if let Some(first) = &first {
            builder.check_template(path, |c| first.contains_key(c))?;
        }
        let schema_column = first.is_some_and(|f| f.contains_key(super::SCHEMA_COLUMN));
        let names = &builder.spec.passthrough;
        let passthrough = (!names.is_empty())
            .then(|| super::passthrough::JsonColumns::infer(path, names))
            .transpose()?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            reader: BufReader::new(file),
            builder,
            line: 0,
            row: 0,
            buf: Vec::new(),
            passthrough,
            schema_column,
        })
    }

    /// A record with its passthrough cells (a cell of another type than
    /// inferred makes it an error row).
    fn record(
        &mut self,
        row: u64,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> InputRecord {
        let mut rec = self.builder.build(row, obj);
        if let Some(pt) = &mut self.passthrough {
            match pt.row(obj) {
                Ok(b) => rec.passthrough = Some(b),
                Err(e) => {
                    let id = &rec.id;
                    rec.body = Err(super::RecordError::Field(format!("record {id}: {e}")));
                }
            }
        }
        rec
    }
}

impl super::RecordSource for JsonlSource {
    fn passthrough_schema(&self) -> Option<arrow::datatypes::SchemaRef> {
        self.passthrough.as_ref().map(|p| p.schema())
    }

    fn has_schema_column(&self) -> bool {
        self.schema_column
    }
}

impl Iterator for JsonlSource {
    type Item = Result<InputRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.buf.clear();
            match self.reader.read_until(b'\n', &mut self.buf) {
                Err(e) => return Some(Err(Error::io(&self.path, e))),
                Ok(0) => return None,
                Ok(_) => {}
            }
            self.line += 1;
            let line = self.line;
            if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let row = self.row;
            self.row += 1;
            // An unreadable line has no id of its own: `#line-N` (reserved,
            // README) never collides with a real id, whatever the ids are.
            let fail = |msg: String| {
                Some(Ok(InputRecord::new(
                    row,
                    format!("#line-{line}"),
                    Err(super::RecordError::Unreadable(msg)),
                )))
            };
            let text = match std::str::from_utf8(&self.buf) {
                Ok(t) => t,
                Err(e) => {
                    return fail(format!(
                        "record at line {line}: invalid UTF-8 at byte {}",
                        e.valid_up_to()
                    ))
                }
            };
            let parsed = serde_json::from_str::<serde_json::Value>(text);
            return match parsed {
                Ok(serde_json::Value::Object(obj)) => Some(Ok(self.record(row, &obj))),
                Ok(other) => fail(format!(
                    "record at line {line}: is {}, expected a JSON object",
                    super::kind(&other)
                )),
                Err(e) => fail(format!("record at line {line}: malformed JSON: {e}")),
            };
        }
    }
}

/// The first line that parses as a JSON object, if any.
fn first_object(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    // Unreadable lines (not UTF-8, not an object) are the reader's error
    // rows later, never a job error here.
    loop {
        line.clear();
        if reader
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?
            == 0
        {
            return Ok(None);
        }
        if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(&line) {
            return Ok(Some(obj));
        }
    }
}
