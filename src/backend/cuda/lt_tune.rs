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
//! What is timed: M at and above [`TUNE_MIN_M`] (below it the products are
//! short and cuBLAS's choice often has a K split), each M below 1,024 alone
//! and larger ones in buckets of [`BUCKET`] tokens timed at the bucket's
//! top (every algorithm there had no split in run 94, cuBLAS's choice
//! included, so a bucket's choice gives its other M cuBLAS's values too).
//! Nothing is timed while a stream captures a CUDA graph (cuBLAS's choice
//! runs then, until the M is timed in an eager step).

use super::lt::{LtAlgo, LtProduct};
use super::{cuda, record_event};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// The smallest token count whose products are timed.
pub const TUNE_MIN_M: usize = 256;
/// From 1,024 tokens, the width of a bucket sharing one choice.
pub const BUCKET: usize = 512;
/// An algorithm replaces cuBLAS's choice only when this much faster.
const MARGIN: f64 = 0.02;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the timing on or off (`engine.cublas_tuning`) for every product
/// of the process from now on.
pub fn set_cublas_tuning(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// What a (device, K, N, bucket) runs.
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

/// The token count whose timing stands for `m`'s.
fn bucket(m: usize) -> usize {
    if m < 1024 {
        m
    } else {
        m.div_ceil(BUCKET) * BUCKET
    }
}

/// y = x wt through the fastest product with cuBLAS's values; `None` where
/// cuBLAS's own choice is the one (or tuning is off, or M is small).
pub fn tuned_product(x: &Tensor, wt: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let n = wt.dim(1)?;
    if !ENABLED.load(Ordering::Relaxed) || m < TUNE_MIN_M {
        return Ok(None);
    }
    let cd = cuda(x.device())?;
    let key = (cd.cuda_stream().context().ordinal(), k, n, bucket(m));
    let known = choices().lock().ok().and_then(|c| c.get(&key).copied());
    let choice = match known {
        Some(c) => c,
        None if capturing(x)? => return Ok(None),
        None => {
            // Timing needs memory for the bucket's rows: a failure (out of
            // memory while the cache holds the rest) keeps cuBLAS's choice.
            let c = tune(x, wt, bucket(m)).unwrap_or_else(|e| {
                tracing::warn!("product {m} x {k} x {n}: not timed ({e}); cuBLAS's choice");
                Choice::Cublas
            });
            if let Ok(mut map) = choices().lock() {
                map.insert(key, c);
            }
            c
        }
    };
    match choice {
        Choice::Cublas => Ok(None),
        Choice::Lt(a) => {
            let x = x.contiguous()?;
            // An algorithm that does not take this M falls back to cuBLAS.
            Ok(LtProduct::new(&x, m, n, k)?.run(&x, wt, &a).ok())
        }
    }
}

/// Whether `x`'s stream is capturing a graph (nothing may be timed).
fn capturing(x: &Tensor) -> Result<bool> {
    let cd = cuda(x.device())?;
    let stream = cd.cuda_stream();
    Ok(stream.capture_status().is_ok_and(|s| {
        s != candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
    }))
}

/// Times cuBLAS's choice and the algorithms with its values at `mt` tokens
/// (x's rows repeated or cut to `mt`), keeping the fastest.
fn tune(x: &Tensor, wt: &Tensor, mt: usize) -> Result<Choice> {
    let (m, k) = x.dims2()?;
    let n = wt.dim(1)?;
    let xt = if mt == m {
        x.contiguous()?
    } else {
        let reps = mt.div_ceil(m);
        let rows: Vec<&Tensor> = std::iter::repeat_n(x, reps).collect();
        Tensor::cat(&rows, 0)?.narrow(0, 0, mt)?.contiguous()?
    };
    let want = xt.matmul(wt)?;
    let p = LtProduct::new(&xt, mt, n, k)?;
    let base = time(&xt, || Ok(xt.matmul(wt).map(|_| ())?))?;
    let mut best: (f64, Choice) = (base * (1.0 - MARGIN), Choice::Cublas);
    for a in p.algos(8)? {
        let Ok(y) = p.run(&xt, wt, &a) else { continue };
        let same = y.ne(&want)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
        if same.to_scalar::<f32>()? != 0.0 {
            continue;
        }
        let t = time(&xt, || p.run(&xt, wt, &a).map(|_| ()))?;
        if t < best.0 {
            best = (t, Choice::Lt(a));
        }
    }
    let what = match &best.1 {
        Choice::Cublas => "cuBLAS's choice".to_string(),
        Choice::Lt(a) => format!("cuBLASLt {}", a.describe()),
    };
    tracing::debug!(
        "product {mt} x {k} x {n}: {what} ({:.1} µs; cuBLAS {:.1})",
        best.0 * 1e6,
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
