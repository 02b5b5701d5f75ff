//! The batch-invariant products (`engine.gptq_kernel = "fused"`): y [M, N]
//! = x [M, K] W^T over f16 weights through a cuBLASLt algorithm without a
//! K split, so that each output is one block's K reduction in order and a
//! row's values do not depend on how many rows share the product.
//!
//! One algorithm per (N, K, weight layout), used at every M: the
//! heuristic's first split-free algorithm for [`REF_ROWS`] rows, checked
//! at each M with `cublasLtMatmulAlgoCheck`. The same kernel at every M
//! gives every output the same K order by construction. (Until run 100 the
//! algorithm was asked per M; the split-free algorithms cuBLASLt offered
//! for Mistral-7B's shapes agreed, but a tiny model's [N, K]-layout
//! products did not, and the end-to-end invariance test failed on the fp16
//! fixture.) Fewer than [`MIN_ROWS`] rows are padded with zero rows to
//! that many; where the algorithm cannot run a row count, the rows are
//! padded further ([`PAD_STEPS`]) and the error names the shape if it runs
//! at none.
//!
//! The algorithm and each M's descriptors are made once and kept (per
//! stream): nothing is timed, so a process's choice is the same every
//! time.

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
pub const REF_ROWS: usize = 512;

/// A product's descriptors, the pinned algorithm as it runs at these rows,
/// and the rows it runs.
struct Plan {
    product: LtProduct,
    algo: LtAlgo,
    rows: usize,
}

/// (stream, M, N, K, layout); M is 0 for the pinned algorithm's entry.
type Key = (usize, usize, usize, usize, WeightLayout);

#[derive(Default)]
struct Plans {
    pinned: HashMap<Key, LtAlgo>,
    by_m: HashMap<Key, Arc<Plan>>,
}

fn plans() -> &'static Mutex<Plans> {
    static P: OnceLock<Mutex<Plans>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(Plans::default()))
}

/// Whether an algorithm reduces each output's K in one block, in order.
fn split_free(a: &LtAlgo) -> bool {
    a.splits() == 1 && a.config[4] == 0
}

/// The heuristic's first split-free algorithm for [`REF_ROWS`] rows of
/// (n, k, w).
fn pin(like: &Tensor, (n, k): (usize, usize), w: WeightLayout) -> Result<LtAlgo> {
    let product = LtProduct::with_layout(like, (REF_ROWS, n, k), w)?;
    product
        .algos(OFFERED)?
        .into_iter()
        .find(split_free)
        .ok_or_else(|| {
            Error::Device(format!(
                "cublaslt offers no algorithm without a K split for [{REF_ROWS}, {k}] x W^T \
                 [{k}, {n}]: the batch-invariant mode cannot run this product"
            ))
        })
}

/// `algo` at `m` rows (or at the rows padded per [`PAD_STEPS`]).
fn make_plan(
    like: &Tensor,
    (m, n, k): (usize, usize, usize),
    w: WeightLayout,
    algo: &LtAlgo,
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
        if let Some(algo) = product.check(algo)? {
            return Ok(Plan {
                product,
                algo,
                rows,
            });
        }
    }
    Err(Error::Device(format!(
        "cublaslt algorithm {algo:?} cannot run [{m}, {k}] x W^T [{k}, {n}] \
         (tried {tried:?} rows): the batch-invariant mode cannot run this product"
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
    let pinned = match map.pinned.get(&(stream, 0, n, k, w)) {
        Some(a) => *a,
        None => {
            let a = pin(like, (n, k), w)?;
            map.pinned.insert((stream, 0, n, k, w), a);
            a
        }
    };
    let p = Arc::new(make_plan(like, (m, n, k), w, &pinned)?);
    map.by_m.insert((stream, m, n, k, w), p.clone());
    Ok(p)
}

/// The algorithm `invariant_product` runs for [m, k] x W^T [k, n] in
/// layout `w` ("id/tile/stages/splits/reduction/cluster", the same for
/// every M) and the rows it runs (m, or m padded).
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
