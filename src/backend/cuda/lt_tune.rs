//! The engine's cuBLAS products over resident f16 weights, timed once per
//! shape and token count against the cuBLASLt algorithms that give the
//! same values (`engine.cublas_tuning`).
//!
//! Run 94 (H200, BENCHMARKS.md) timed every algorithm cuBLASLt's heuristic
//! offers for Mistral-7B's products beside cuBLAS's own choice: at 508
//! tokens gate+up took 169.5 µs against cuBLAS's 184.0, at 8,049 2,570
//! against 2,815, while elsewhere cuBLAS's choice was the fastest (down at
//! 8,049: 1,226 against 1,352). Every algorithm without a K split gave the
//! same values as every other (and as cuBLAS's choice where that has no
//! split): the order of a K reduction in one block is fixed. So a product
//! may take whichever of cuBLAS's choice and those algorithms is fastest
//! without its bits depending on the timing: the candidates are the
//! algorithms whose values equal cuBLAS's choice's, checked when timed.
//!
//! What is timed: each token count from [`TUNE_MIN_M`] to below
//! [`TUNE_MAX_M`] alone, the first time a shape meets it in an eager step
//! (a decode batch size: the step before its CUDA graph is captured), and
//! at most [`MAX_TUNED`] (shape, count) pairs per process, so that a job whose batch
//! drains one sequence at a time pays for a few only. Below 256 tokens
//! the products are short and cuBLAS's choice often has a K split; from
//! 1,024 (a prefill or mixed step, whose token count changes every step)
//! nothing is timed: run 95 timed those in buckets of 512 at the bucket's
//! top, and W1 ran 11% slower (not broken down; run 94 already shows the
//! fastest algorithm at 8,049 tokens is not the one at 8,192, so a choice
//! does not carry across counts). Nothing is timed while a stream captures
//! a graph (cuBLAS's choice runs then).
//!
//! Off by default (BENCHMARKS.md runs 95-97, H200): W1 2.5% and W4 11%
//! slower with it on, the timing in each process costing more than the
//! faster products save; with the choices kept across processes (tried in
//! run 97, then removed) W1 gained nothing either.

use super::lt::{count_differing, LtAlgo, LtProduct};
use super::{cuda, record_event};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The smallest token count whose products are timed.
pub const TUNE_MIN_M: usize = 256;
/// Token counts from here on keep cuBLAS's choice.
pub const TUNE_MAX_M: usize = 1024;
/// The (shape, token count) pairs timed per process at most.
pub const MAX_TUNED: usize = 32;
/// An algorithm replaces cuBLAS's choice only when this much faster.
const MARGIN: f64 = 0.02;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns the timing on or off (`engine.cublas_tuning`) for every product
/// of the process from now on.
pub fn set_cublas_tuning(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// What a (device, K, N, M) runs.
#[derive(Clone, Copy)]
enum Choice {
    Cublas,
    Lt(LtAlgo),
}

type Key = (usize, usize, usize, usize);

fn choices() -> &'static Mutex<HashMap<Key, Choice>> {
    static C: OnceLock<Mutex<HashMap<Key, Choice>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// y = x wt through the fastest product with cuBLAS's values; `None` where
/// cuBLAS's own choice is the one (or tuning is off, or M is small).
pub fn tuned_product(x: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let n = wt.dim(1)?;
    if !ENABLED.load(Ordering::Relaxed) || !(TUNE_MIN_M..TUNE_MAX_M).contains(&m) {
        return Ok(None);
    }
    let cd = cuda(x.device())?;
    let key = (cd.cuda_stream().context().ordinal(), k, n, m);
    let (known, full) = match choices().lock() {
        Ok(c) => (c.get(&key).copied(), c.len() >= MAX_TUNED),
        Err(_) => (None, true),
    };
    let choice = match known {
        Some(c) => c,
        None if full || capturing(x)? => return Ok(None),
        None => {
            // A failure to time (out of memory for the candidates' outputs
            // while the cache holds the rest) keeps cuBLAS's choice.
            let c = tune(x, wt).unwrap_or_else(|e| {
                tracing::warn!("product {m} x {k} x {n}: not timed ({e}); cuBLAS's choice");
                Choice::Cublas
            });
            remember(key, c);
            c
        }
    };
    match choice {
        Choice::Cublas => Ok(None),
        Choice::Lt(a) => {
            let x = x.contiguous()?;
            match LtProduct::new(&x, m, n, k).and_then(|p| p.run(&x, wt, &a)) {
                Ok(y) => Ok(Some(y)),
                Err(e) => {
                    // Timed at this M, so not expected: cuBLAS's choice from
                    // now on.
                    tracing::warn!(
                        "product {m} x {k} x {n}: cuBLASLt failed ({e}); cuBLAS's choice"
                    );
                    remember(key, Choice::Cublas);
                    Ok(None)
                }
            }
        }
    }
}

fn remember(key: Key, c: Choice) {
    if let Ok(mut map) = choices().lock() {
        map.insert(key, c);
    }
}

/// Whether `x`'s stream is capturing a graph (nothing may be timed).
fn capturing(x: &Tensor) -> Result<bool> {
    let cd = cuda(x.device())?;
    let stream = cd.cuda_stream();
    // A status that cannot be read counts as capturing: nothing is timed.
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus as Status;
    Ok(!matches!(
        stream.capture_status(),
        Ok(Status::CU_STREAM_CAPTURE_STATUS_NONE)
    ))
}

/// Times cuBLAS's choice and the algorithms with its values on `x`,
/// keeping the fastest. The candidates are filtered by their values alone
/// (an algorithm with a K split qualifies where it gives cuBLAS's values,
/// as one with cuBLAS's own split did in run 94).
fn tune(x: &Tensor, wt: &Tensor) -> Result<Choice> {
    let (mt, k) = x.dims2()?;
    let n = wt.dim(1)?;
    let xt = x.contiguous()?;
    let want = xt.matmul(wt)?;
    let p = LtProduct::new(&xt, mt, n, k)?;
    let base = time(&xt, || Ok(xt.matmul(wt).map(|_| ())?))?;
    let mut best: (f64, Choice) = (base * (1.0 - MARGIN), Choice::Cublas);
    for a in p.algos(8)? {
        let Ok(y) = p.run(&xt, wt, &a) else { continue };
        if count_differing(&y, &want)? != 0 {
            continue;
        }
        let t = time(&xt, || p.run(&xt, wt, &a).map(|_| ()))?;
        if t < best.0 {
            best = (t, Choice::Lt(a));
        }
    }
    let what = match &best.1 {
        Choice::Cublas => "cuBLAS's choice".to_string(),
        Choice::Lt(a) => format!("cuBLASLt {} ({:.1} µs)", a.describe(), best.0 * 1e6),
    };
    tracing::debug!(
        "product {mt} x {k} x {n}: {what}; cuBLAS's choice {:.1} µs",
        base * 1e6
    );
    Ok(best.1)
}

/// Device seconds per call of `f` (one call to warm, then the median of
/// three single calls between events).
fn time(x: &Tensor, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let dev = x.device();
    f()?;
    let mut v = Vec::new();
    for _ in 0..3 {
        let a = record_event(dev)?;
        f()?;
        let b = record_event(dev)?;
        v.push(a.elapsed_ms(&b)? / 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[1])
}
