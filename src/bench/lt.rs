//! How far cuBLAS's own choice of algorithm is from the best it has, on
//! Mistral-7B's products: for each shape and token count, candle's
//! `matmul` (cuBLAS's heuristic) beside every algorithm cuBLASLt's
//! heuristic offers, each timed from a CUDA graph and compared with
//! `matmul`'s output value for value.

use crate::cuda::{self, LtProduct};
use crate::Result;
use candle_core::{Device, Tensor};
use serde::Serialize;

/// Mistral-7B's products as the engine runs them (K, N).
pub const LT_SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate+up", 4096, 28672),
    ("down", 14336, 4096),
    ("lm head", 4096, 32000),
];

/// One algorithm's time and whether its output equals `matmul`'s.
#[derive(Debug, Clone, Serialize)]
pub struct LtAlgoTime {
    /// id/tile/stages/splits/reduction/cluster.
    pub config: String,
    pub splits: u32,
    pub us: Option<f64>,
    /// Every output value equals cuBLAS's own choice's.
    pub same_values: bool,
}

/// One shape at one token count.
#[derive(Debug, Clone, Serialize)]
pub struct LtRow {
    pub shape: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// candle's `matmul` (cuBLAS's heuristic), device µs.
    pub cublas_us: Option<f64>,
    /// The batch-invariant product (`cuda::invariant_product`, the
    /// `fused` mode's), device µs.
    pub invariant_us: Option<f64>,
    /// The algorithms cuBLASLt offers, in its heuristic's order.
    pub algos: Vec<LtAlgoTime>,
}

impl LtRow {
    /// The fastest algorithm, among those whose values equal `matmul`'s
    /// when `same` is set.
    pub fn best(&self, same: bool) -> Option<&LtAlgoTime> {
        self.algos
            .iter()
            .filter(|a| a.us.is_some() && (a.same_values || !same))
            .min_by(|a, b| {
                a.us.unwrap_or(f64::MAX)
                    .total_cmp(&b.us.unwrap_or(f64::MAX))
            })
    }
}

/// The table over `ms` for every shape in [`LT_SHAPES`] (`count`
/// algorithms asked of the heuristic).
pub fn lt_table(dev: &Device, ms: &[usize], count: usize) -> Result<Vec<LtRow>> {
    let cd = cuda::cuda(dev)?;
    let mut rows = Vec::new();
    for (si, &(shape, k, n)) in LT_SHAPES.iter().enumerate() {
        let wt = cuda::fill_f16(&cd, (k, n), 40 + si as u64, -0.05, 0.05)?;
        for &m in ms {
            let x = cuda::fill_f16(&cd, (m, k), 50 + m as u64, -1.0, 1.0)?;
            let iters = if m <= 256 { 20 } else { 5 };
            let us = |t: Option<f64>| t.map(|t| t * 1e6);
            let reference = x.matmul(&wt)?;
            let cublas_us = us(cuda::graph_time(dev, iters, || {
                x.matmul(&wt)?;
                Ok(())
            })?);
            cuda::invariant_product(&x, &wt, cuda::WeightLayout::Kn)?; // its plan, once
            let invariant_us = us(cuda::graph_time(dev, iters, || {
                cuda::invariant_product(&x, &wt, cuda::WeightLayout::Kn)?;
                Ok(())
            })?);
            let p = LtProduct::new(&x, m, n, k)?;
            let mut algos = Vec::new();
            for a in p.algos(count)? {
                let y = match p.run(&x, &wt, &a) {
                    Ok(y) => y,
                    Err(e) => {
                        tracing::warn!("{shape} M {m}: algorithm {a:?} failed: {e}");
                        continue;
                    }
                };
                let t = us(cuda::graph_time(dev, iters, || {
                    p.run(&x, &wt, &a)?;
                    Ok(())
                })?);
                algos.push(LtAlgoTime {
                    config: a.describe(),
                    splits: a.splits(),
                    us: t,
                    same_values: cuda::count_differing(&y, &reference)? == 0,
                });
            }
            rows.push(LtRow {
                shape,
                m,
                k,
                n,
                cublas_us,
                invariant_us,
                algos,
            });
        }
    }
    Ok(rows)
}

/// Whether one row's values depend on M through split-free algorithms:
/// for each shape, the first 8 rows of an M-row product (the heuristic's
/// first split-free offer) against the same rows at the smallest M that
/// has one: what the batch-invariant `fused` mode relies on
/// (`cuda::invariant_product`; its GPU tests check the rows at every M).
#[derive(Debug, Clone, Serialize)]
pub struct LtInvariance {
    pub shape: &'static str,
    /// (M, the split-free algorithm used, rows equal to the first M's);
    /// `None` where no split-free algorithm was offered.
    pub at: Vec<(usize, Option<String>, Option<bool>)>,
}

/// [`LtInvariance`] for every shape in [`LT_SHAPES`] over `ms` (ascending).
pub fn lt_invariance(dev: &Device, ms: &[usize]) -> Result<Vec<LtInvariance>> {
    let cd = cuda::cuda(dev)?;
    let top = ms.iter().copied().max().unwrap_or(8).max(8);
    let mut out = Vec::new();
    for (si, &(shape, k, n)) in LT_SHAPES.iter().enumerate() {
        let wt = cuda::fill_f16(&cd, (k, n), 60 + si as u64, -0.05, 0.05)?;
        let x_all = cuda::fill_f16(&cd, (top, k), 70 + si as u64, -1.0, 1.0)?;
        let mut first: Option<Tensor> = None;
        let mut at = Vec::new();
        for &m in ms.iter().filter(|&&m| m >= 8) {
            let x = x_all.narrow(0, 0, m)?.contiguous()?;
            let p = LtProduct::new(&x, m, n, k)?;
            let Some(a) = p.algos(16)?.into_iter().find(|a| a.splits() == 1) else {
                at.push((m, None, None));
                continue;
            };
            let rows = p.run(&x, &wt, &a)?.narrow(0, 0, 8)?;
            let same = match &first {
                Some(f) => Some(cuda::count_differing(&rows, f)? == 0),
                None => {
                    first = Some(rows);
                    Some(true)
                }
            };
            at.push((m, Some(a.describe()), same));
        }
        out.push(LtInvariance { shape, at });
    }
    Ok(out)
}
