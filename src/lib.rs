//! `runner`: offline batch text generation for Mistral-7B-OpenOrca in GPTQ form.
//!
//! A job reads prompts (JSONL or Parquet), renders and tokenizes them, runs
//! them through one Mistral implementation whose linear layers are dense or
//! GPTQ, samples per record with a per-record seeded RNG, and writes one
//! Parquet row per record. Module dependencies point one way:
//! `cli -> job -> engine -> {scheduler, kv, model, sampler, output, input, prompt} -> config`.

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod guide;
pub mod input;
pub mod job;
pub mod kv;
pub mod model;
pub mod output;
pub mod prompt;
pub mod quant;
pub mod report;
pub mod sampler;
pub mod scheduler;
pub mod scoring;

pub use backend::cuda;
pub use error::{Error, Result};

/// Version string written into every output row.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
