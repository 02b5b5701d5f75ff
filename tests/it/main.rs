//! Integration tests: the real `runner` binary and library on the fixtures
//! in `../shared/fixtures` (GPTQModel checkpoints and its reference outputs).

mod bad_input;
mod batching;
mod common;
mod config_errors;
mod datagen;
mod deploy;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_datagen;
mod input_fuzz;
mod kv_fp8;
mod logprobs;
mod merge;
mod newcomer;
mod openai;
mod reference_logits;
mod resume;
mod samples;
mod scale;
mod structured;
mod submit_greedy;
mod sweep;
