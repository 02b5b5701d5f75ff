//! The batch-invariant products (`engine.gptq_kernel = "fused"`): y [M, N]
//! = x [M, K] W^T over f16 weights through a cuBLASLt algorithm without a
//! K split, so that each output is one block's K reduction in order and a
//! row's values do not depend on how many rows share the product.
//!
//! The order, for every output at every M: one thread block reduces the
//! output's whole K in its main loop, k-steps of 16 in order, each added
//! to an f32 accumulator by the same tensor-core instruction, and the sum
//! rounded to f16 once. What keeps it the same at every M: one kernel
//! family (cuBLASLt algorithm id) per (N, K, weight layout), the one the
//! heuristic offers first without a K split for [`REF_ROWS`] rows; at each
//! M the heuristic's first offer of that id without a K split or a
//! reduction scheme, else the reference algorithm itself where
//! `cublasLtMatmulAlgoCheck` says it runs there. The tile may follow M: a
//! tile changes which block computes an output, and on every shape tested
//! each row kept its bits through every tile offered (pinning one whole
//! algorithm instead cost W1 at 64 sequences 35%, run 100).
//! Fewer than [`MIN_ROWS`] rows are padded with zero rows to that many;
//! where neither runs at a row count, the rows are padded further
//! ([`PAD_STEPS`]) and the error names the shape if none runs.
//!
//! The GPU tests check each row's bits at M = 1..4,096 on Mistral-7B's
//! shapes and 1..1,024 on the fixtures' (`gpu::lt`, `gpu::gptq`), and whole
//! jobs run one record at a time against 64 at a time (`gpu::invariant`).
//! The reference and each M's plan are made once and kept (per stream):
//! nothing is timed, so a process's choice is the same every time.

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
/// The rows the algorithm of an (N, K, layout) is asked for (W1's decode
/// batch, where the mode's speed is measured).
const REF_ROWS: usize = 512;

/// A product's descriptors, its algorithm and the rows it runs.
struct Plan {
    product: LtProduct,
    algo: LtAlgo,
    rows: usize,
}

/// (stream, M, N, K, layout); M is 0 for the reference algorithm's entry.
type Key = (usize, usize, usize, usize, WeightLayout);

#[derive(Default)]
struct Plans {
    reference: HashMap<Key, LtAlgo>,
    by_m: HashMap<Key, Arc<Plan>>,
}

fn plans() -> &'static Mutex<Plans> {
    static P: OnceLock<Mutex<Plans>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Plans::default()))
}

/// The heuristic's first split-free algorithm for [`REF_ROWS`] rows of
/// (n, k, w).
fn reference_algo(like: &Tensor, (n, k): (usize, usize), w: WeightLayout) -> Result<LtAlgo> {
    let product = LtProduct::with_layout(like, (REF_ROWS, n, k), w)?;
    product
        .algos(OFFERED)?
        .into_iter()
        .find(LtAlgo::split_free)
        .ok_or_else(|| {
            Error::Device(format!(
                "cublaslt offers no algorithm without a K split for [{REF_ROWS}, {k}] x W^T \
                 [{k}, {n}]: the batch-invariant mode cannot run this product"
            ))
        })
}

/// The algorithm of `reference`'s kernel family for `m` rows (or for the
/// rows padded per [`PAD_STEPS`]).
fn make_plan(
    like: &Tensor,
    (m, n, k): (usize, usize, usize),
    w: WeightLayout,
    reference: &LtAlgo,
) -> Result<Plan> {
    let first = m.max(MIN_ROWS);
    let tries = std::iter::once(first).chain(PAD_STEPS.iter().map(|s| first.next_multiple_of(*s)));
    let mut tried = Vec::new();
    for rows in tries {
        if tried.contains(&rows) {
            continue;
        }
        tried.push(rows);
        let product = LtProduct::with_layout(like, (rows, n, k), w)?;
        let offered = product
            .algos(OFFERED)?
            .into_iter()
            .find(|a| a.split_free() && a.config[0] == reference.config[0]);
        let algo = match offered {
            Some(a) => Some(a),
            None => product.check(reference)?,
        };
        if let Some(algo) = algo {
            return Ok(Plan {
                product,
                algo,
                rows,
            });
        }
    }
    Err(Error::Device(format!(
        "cublaslt has no algorithm of family {} without a K split for [{m}, {k}] x W^T \
         [{k}, {n}] (tried {tried:?} rows): the batch-invariant mode cannot run this product",
        reference.config[0]
    )))
}

/// The plan of (m, n, k, w) on `like`'s stream, made once.
fn plan_of(like: &Tensor, (m, n, k): (usize, usize, usize), w: WeightLayout) -> Result<Arc<Plan>> {
    let stream = device_of(like)?.cuda_stream().cu_stream() as usize;
    let mut map = plans()
        .lock()
        .map_err(|_| Error::Device("cublaslt: the plan map's lock is poisoned".into()))?;
    if let Some(p) = map.by_m.get(&(stream, m, n, k, w)) {
        return Ok(p.clone());
    }
    let reference = match map.reference.get(&(stream, 0, n, k, w)) {
        Some(a) => *a,
        None => {
            let a = reference_algo(like, (n, k), w)?;
            map.reference.insert((stream, 0, n, k, w), a);
            a
        }
    };
    let p = Arc::new(make_plan(like, (m, n, k), w, &reference)?);
    map.by_m.insert((stream, m, n, k, w), p.clone());
    Ok(p)
}

/// The algorithm `invariant_product` runs for [m, k] x W^T [k, n] in
/// layout `w` ("id/tile/stages/splits/reduction/cluster"; the id is the
/// same at every M) and the rows it runs (m, or m padded).
pub fn invariant_plan(
    like: &Tensor,
    (m, n, k): (usize, usize, usize),
    w: WeightLayout,
) -> Result<(String, usize)> {
    let p = plan_of(like, (m.max(1), n, k), w)?;
    Ok((p.algo.describe(), p.rows))
}

/// y [m, n] = x [m, k] W^T with each output's K reduced in one block in
/// order, `w` the f16 weights laid out as `layout` says (contiguous).
pub fn invariant_product(x: &Tensor, w: &Tensor, layout: WeightLayout) -> Result<Tensor> {
    let (m, k) = x.dims2()?;
    let n = match layout {
        WeightLayout::Kn => w.dim(1)?,
        WeightLayout::Nk => w.dim(0)?,
    };
    if m == 0 {
        return empty::<f16>(&device_of(x)?, (0, n));
    }
    let plan = plan_of(x, (m, n, k), layout)?;
    let x = x.contiguous()?;
    if plan.rows == m {
        return plan.product.run(&x, w, &plan.algo);
    }
    let zeros = Tensor::zeros((plan.rows - m, k), DType::F16, x.device())?;
    let xp = Tensor::cat(&[&x, &zeros], 0)?;
    Ok(plan.product.run(&xp, w, &plan.algo)?.narrow(0, 0, m)?)
}
