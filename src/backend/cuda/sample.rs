//! Launch wrappers of the device sampler's kernels in `kernels/ops.cu`:
//! the repetition penalty, each row's softmax normaliser, and the draw over
//! a whole row, in the host sampler's arithmetic (see `crate::sampler`).

use super::{device_of, empty, launch, ptr, Arg, OPS};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType, Tensor};

/// Threads per row of the row kernels (the f64 prefix table in
/// `row_stats` holds one entry per thread).
const ROW_THREADS: u32 = 256;

fn rows_f32(rows: &Tensor, n: usize, what: &str) -> Result<(usize, usize)> {
    let (r, v) = rows.dims2()?;
    if rows.dtype() != DType::F32 || !rows.is_contiguous() || r != n {
        return Err(Error::Model(format!(
            "{what}: rows must be contiguous f32 [{n}, vocab], got {:?} {:?}",
            rows.dtype(),
            rows.dims()
        )));
    }
    Ok((r, v))
}

fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// HF's repetition penalty in place on f32 `rows` [R, V]: row r's tokens
/// `seen[r]` (each distinct one once) are divided by `penalties[r]` when
/// positive and multiplied when negative.
pub fn penalize_rows(rows: &Tensor, seen: &[Vec<u32>], penalties: &[f32]) -> Result<()> {
    let (r, v) = rows_f32(rows, seen.len(), "penalize_rows")?;
    if penalties.len() != r {
        return Err(Error::Model(format!(
            "penalize_rows: {} penalties for {r} rows",
            penalties.len()
        )));
    }
    let mut ids = Vec::new();
    let mut row_of = Vec::new();
    for (i, s) in seen.iter().enumerate() {
        let mut d = s.clone();
        d.sort_unstable();
        d.dedup();
        row_of.extend(std::iter::repeat_n(i as u32, d.len()));
        ids.extend(d);
    }
    if ids.is_empty() {
        return Ok(());
    }
    let dev = device_of(rows)?;
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, rows.device())?;
    let row_of = Tensor::from_vec(row_of, n, rows.device())?;
    let pen = Tensor::from_vec(penalties.to_vec(), r, rows.device())?;
    let args = [
        Arg::P(ptr::<f32>(rows)?),
        Arg::P(ptr::<u32>(&ids)?),
        Arg::P(ptr::<u32>(&row_of)?),
        Arg::P(ptr::<f32>(&pen)?),
        Arg::I(n as i32),
        Arg::I(v as i32),
    ];
    launch(&dev, &OPS, "penalize_rows", super::grid(n, 256), &args)
}

/// Per row at its temperature: (the largest finite logit / t, the f64 sum
/// of exp(f64(logit / t - max)) over the finite logits).
pub fn row_norms(rows: &Tensor, temps: &[f32]) -> Result<Vec<(f32, f64)>> {
    let (r, v) = rows_f32(rows, temps.len(), "row_norms")?;
    let dev = device_of(rows)?;
    let t = Tensor::from_vec(temps.to_vec(), r, rows.device())?;
    let maxes = empty::<f32>(&dev, r)?;
    let sums = empty::<f64>(&dev, r)?;
    let args = [
        Arg::P(ptr::<f32>(rows)?),
        Arg::P(ptr::<f32>(&t)?),
        Arg::P(ptr::<f32>(&maxes)?),
        Arg::P(ptr::<f64>(&sums)?),
        Arg::I(v as i32),
    ];
    launch(&dev, &OPS, "row_norms", per_row(r), &args)?;
    Ok(maxes
        .to_vec1::<f32>()?
        .into_iter()
        .zip(sums.to_vec1::<f64>()?)
        .collect())
}

/// Per row: the token drawn from softmax(logits / t) over every finite
/// logit, in id order, with the uniform `us[r]` (as the host sampler draws
/// with neither top-k nor top-p); `None` for a row with no finite logit.
pub fn draw_rows(rows: &Tensor, temps: &[f32], us: &[f64]) -> Result<Vec<Option<u32>>> {
    let (r, v) = rows_f32(rows, temps.len(), "draw_rows")?;
    if us.len() != r {
        return Err(Error::Model(format!(
            "draw_rows: {} uniforms for {r} rows",
            us.len()
        )));
    }
    let dev = device_of(rows)?;
    let t = Tensor::from_vec(temps.to_vec(), r, rows.device())?;
    let u = Tensor::from_vec(us.to_vec(), r, rows.device())?;
    let ids = empty::<u32>(&dev, r)?;
    let args = [
        Arg::P(ptr::<f32>(rows)?),
        Arg::P(ptr::<f32>(&t)?),
        Arg::P(ptr::<f64>(&u)?),
        Arg::P(ptr::<u32>(&ids)?),
        Arg::I(v as i32),
    ];
    launch(&dev, &OPS, "draw_rows", per_row(r), &args)?;
    Ok(ids
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| (i != u32::MAX).then_some(i))
        .collect())
}
