//! Dataset generation on the GPU (built with `--features cuda`; needs a
//! GPU and fails without one): log-probabilities from the device's top-k
//! and gather against GPTQModel's fp16 logits, and `generation.n` forks
//! whose copy-on-write runs on the device's cache.

use crate::logprobs::{check, Setting};

#[test]
fn gpu_logprobs_match_the_reference_log_softmax() {
    // Logits within the fixture's 0.05 of the reference's, and so is the
    // log-normalizer: a log-probability within 0.1.
    check(&Setting {
        device: "cuda",
        f16: true,
        tol: 0.1,
        margin: 0.1,
    });
}

#[test]
fn gpu_greedy_samples_equal_the_single_greedy_completion() {
    crate::samples::greedy_samples_agree(&["model.dtype=f16", "engine.device=cuda"]);
}

/// Structured output on the GPU (device argmax and top-k over the masked
/// rows): a JSON-schema job's stopped rows validate, and a schema that 40
/// tokens cannot finish runs every row to its length.
#[test]
fn gpu_json_schema_rows_follow_the_schema() {
    crate::structured::json_schema_job_on(&["model.dtype=f16", "engine.device=cuda"]);
}
