//! The batch-invariant products (`engine.gptq_kernel = "fused"`): y [M, N]
//! = x [M, K] W^T over f16 weights through a cuBLASLt algorithm without a
//! K split, so that each output is one block's K reduction in order and a
//! row's values do not depend on how many rows share the product.
//!
//! Which split-free algorithm runs may change with M (cuBLASLt's heuristic
//! offers different tiles at different M); run 98 (H200, BENCHMARKS.md)
//! found every split-free algorithm it offered for Mistral-7B's five
//! shapes at 8-4,096 rows giving rows 0-7 the same values, and the GPU test
//! `gpu::gptq::fused_gptq_rows_do_not_depend_on_the_batch` checks rows at
//! M = 1..4096 through this path. Fewer than [`MIN_ROWS`] rows are padded
//! with zero rows to that many, so that the smallest products take the
//! same kind of algorithm as the rest; where the heuristic offers no
//! split-free algorithm at a row count, the rows are padded further
//! ([`PAD_STEPS`]) and the error names the shape if none is found.
//!
//! The algorithm is asked once per (stream, M, N, K, layout) and kept: the
//! heuristic is deterministic, so a process's choice is the same every
//! time, and nothing is timed.

use super::lt::{LtAlgo, LtProduct, WeightLayout};
use super::{device_of, empty};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use half::f16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Products of fewer rows run padded to this many.
pub const MIN_ROWS: usize = 16;
/// Where a row count is offered no split-free algorithm, the padded counts
/// tried next: the rows rounded up to each of these multiples.
pub const PAD_STEPS: [usize; 3] = [64, 256, 1024];
/// How many algorithms the heuristic is asked for.
const OFFERED: usize = 32;

/// A product's descriptors, its split-free algorithm and the rows it runs.
struct Plan {
    product: LtProduct,
    algo: LtAlgo,
    rows: usize,
}

type Key = (usize, usize, usize, usize, WeightLayout);

fn plans() -> &'static Mutex<HashMap<Key, Arc<Plan>>> {
    static P: OnceLock<Mutex<HashMap<Key, Arc<Plan>>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Whether an algorithm reduces each output's K in one block, in order.
fn split_free(a: &LtAlgo) -> bool {
    a.splits() == 1 && a.config[4] == 0
}

/// The first split-free algorithm the heuristic offers for `m` rows (or
/// for the rows padded per [`PAD_STEPS`]).
fn make_plan(like: &Tensor, (m, n, k): (usize, usize, usize), w: WeightLayout) -> Result<Plan> {
    let first = m.max(MIN_ROWS);
    let tries = std::iter::once(first).chain(PAD_STEPS.iter().map(|s| first.next_multiple_of(*s)));
    let mut tried = Vec::new();
    for rows in tries {
        if tried.contains(&rows) {
            continue;
        }
        tried.push(rows);
        let product = LtProduct::with_layout(like, (rows, n, k), w)?;
        if let Some(algo) = product.algos(OFFERED)?.into_iter().find(split_free) {
            return Ok(Plan {
                product,
                algo,
                rows,
            });
        }
    }
    Err(Error::Device(format!(
        "cublaslt offers no algorithm without a K split for [{m}, {k}] x W^T [{k}, {n}] \
         (tried {tried:?} rows): the batch-invariant mode cannot run this product"
    )))
}

/// y [m, n] = x [m, k] W^T with each output's K reduced in one block in
/// order, `w` the f16 weights laid out as `layout` says (contiguous).
pub fn invariant_product(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = match layout {
        WeightLayout::Kn => w.dim(1)?,
        WeightLayout::Nk => w.dim(0)?,
    };
    let dev = device_of(x)?;
    if m == 0 {
        return empty::<f16>(&dev, (0, n));
    }
    let stream = dev.cuda_stream().cu_stream() as usize;
    let key = (stream, m, n, k, layout);
    let plan = {
        let mut map = plans()
            .lock()
            .map_err(|_| Error::Device("cublaslt: the plan map's lock is poisoned".into()))?;
        match map.get(&key) {
            Some(p) => p.clone(),
            None => {
                let p = Arc::new(make_plan(x, (m, n, k), layout)?);
                map.insert(key, p.clone());
                p
            }
        }
    };
    let x = x.contiguous()?;
    if plan.rows == m {
        return plan.product.run(&x, w, &plan.algo);
    }
    let zeros = Tensor::zeros((plan.rows - m, k), DType::F16, x.device())?;
    let xp = Tensor::cat(&[&x, &zeros], 0)?;
    Ok(plan.product.run(&xp, w, &plan.algo)?.narrow(0, 0, m)?)
}
