//! The log-probability columns: `completion_logprobs` (list<float32>),
//! `completion_top_logprobs` (list<list<struct<token_id: int32, logprob:
//! float32>>>) and `prompt_logprobs` (list<float32>, null for the first
//! prompt token).

use super::{JobMeta, OutputRow};
use arrow::array::{ArrayRef, Float32Builder, Int32Builder, ListBuilder, StructBuilder};
use arrow::datatypes::{DataType, Field, Fields};
use std::sync::Arc;

fn float_list() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float32, true)))
}

fn top_fields() -> Fields {
    Fields::from(vec![
        Field::new("token_id", DataType::Int32, false),
        Field::new("logprob", DataType::Float32, false),
    ])
}

fn top_list() -> DataType {
    let entry = DataType::Struct(top_fields());
    let step = DataType::List(Arc::new(Field::new("item", entry, true)));
    DataType::List(Arc::new(Field::new("item", step, true)))
}

/// The fields the job's settings add (null for error rows).
pub fn fields(meta: &JobMeta) -> Vec<Field> {
    let mut f = Vec::new();
    if meta.logprobs > 0 {
        f.push(Field::new("completion_logprobs", float_list(), true));
        f.push(Field::new("completion_top_logprobs", top_list(), true));
    }
    if meta.prompt_logprobs {
        f.push(Field::new("prompt_logprobs", float_list(), true));
    }
    f
}

/// The columns of [`fields`] for `rows`.
pub fn columns(meta: &JobMeta, rows: &[OutputRow]) -> Vec<ArrayRef> {
    let mut cols: Vec<ArrayRef> = Vec::new();
    if meta.logprobs > 0 {
        let mut chosen = ListBuilder::new(Float32Builder::new());
        let entry = StructBuilder::from_fields(top_fields(), 0);
        let mut top = ListBuilder::new(ListBuilder::new(entry));
        for r in rows {
            match &r.logprobs {
                Some(lp) => {
                    chosen.values().append_slice(&lp.chosen);
                    chosen.append(true);
                    for step in &lp.top {
                        let s = top.values().values();
                        for &(tok, l) in step {
                            s.field_builder::<Int32Builder>(0)
                                .expect("token_id is int32")
                                .append_value(tok as i32);
                            s.field_builder::<Float32Builder>(1)
                                .expect("logprob is float32")
                                .append_value(l);
                            s.append(true);
                        }
                        top.values().append(true);
                    }
                    top.append(true);
                }
                None => {
                    chosen.append(false);
                    top.append(false);
                }
            }
        }
        cols.push(Arc::new(chosen.finish()));
        cols.push(Arc::new(top.finish()));
    }
    if meta.prompt_logprobs {
        let mut b = ListBuilder::new(Float32Builder::new());
        for r in rows {
            match &r.prompt_logprobs {
                Some(v) => {
                    for &x in v {
                        b.values().append_option(x);
                    }
                    b.append(true);
                }
                None => b.append(false),
            }
        }
        cols.push(Arc::new(b.finish()));
    }
    cols
}
