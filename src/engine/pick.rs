//! Sampler picks: the next token of every sampling chunk, chosen on the
//! device where the settings allow (greedy argmax; top-k candidates on
//! CUDA), else from the row's logits on the host.

use super::runner::StepLogits;
use crate::config::GenerationParams;
use crate::scheduler::{RequestKind, Scheduler, StepPlan};
use crate::Result;
use candle_core::{DType, Tensor};

/// A sampled token, or what to sample it from on the host.
#[derive(Debug, Clone)]
pub enum Picked {
    /// Chosen on the device (greedy).
    Token(u32),
    /// The row's logits, for the host sampler.
    Logits(Vec<f32>),
    /// The device's top-k `(token, logit / t)` in the host sampler's order.
    Candidates(Vec<(u32, f32)>),
}

#[derive(Debug, PartialEq)]
enum Route {
    Skip,
    DeviceArgmax,
    DeviceTopK,
    Host,
}

/// Where a row's token is picked: on the device when the backend samples
/// there (`top_k_max > 0`), no repetition penalty needs the history and no
/// stop token is masked (`generated < min_new_tokens`).
fn route(top_k_max: usize, p: &GenerationParams, generated: usize) -> Route {
    if top_k_max == 0 || p.repetition_penalty != 1.0 || generated < p.min_new_tokens {
        Route::Host
    } else if p.temperature == 0.0 {
        Route::DeviceArgmax
    } else if p.top_k >= 1 && p.top_k <= top_k_max {
        Route::DeviceTopK
    } else {
        Route::Host
    }
}

/// Per chunk of the plan: the pick of a generation chunk that samples,
/// `None` for every other chunk.
pub fn pick(out: &StepLogits, plan: &StepPlan, sched: &Scheduler) -> Result<Vec<Option<Picked>>> {
    let top_k_max = out.ops.device_top_k_max();
    // Constrained rows are masked on the device; their masked copies are
    // appended to the logits and picked from there.
    let (logits, masked_row) = masked(out, plan, sched)?;
    let routes: Vec<Route> = plan
        .chunks
        .iter()
        .zip(&out.spans)
        .map(|(c, &(_, n))| {
            let req = sched.request(c.seq);
            if req.kind != RequestKind::Generate || n == 0 {
                Route::Skip
            } else {
                route(top_k_max, &req.params, req.generated().len())
            }
        })
        .collect();
    let chunks_of =
        |want: Route| -> Vec<usize> { (0..routes.len()).filter(|&i| routes[i] == want).collect() };
    // The sampled row is the last of a generation chunk's span.
    let row = |i: usize| masked_row[i].unwrap_or((out.spans[i].0 + out.spans[i].1 - 1) as u32);
    let mut picks: Vec<Option<Picked>> = (0..routes.len()).map(|_| None).collect();
    let argmax = chunks_of(Route::DeviceArgmax);
    if !argmax.is_empty() {
        let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
        for i in argmax {
            picks[i] = Some(Picked::Token(ids[row(i) as usize]));
        }
    }
    let mut host = chunks_of(Route::Host);
    let topk = chunks_of(Route::DeviceTopK);
    if !topk.is_empty() {
        let params: Vec<&GenerationParams> = topk
            .iter()
            .map(|&i| &sched.request(plan.chunks[i].seq).params)
            .collect();
        let rows = select(&logits, topk.iter().map(|&i| row(i)).collect())?;
        let k = params.iter().map(|p| p.top_k).max().unwrap_or(1);
        let temps: Vec<f32> = params.iter().map(|p| p.temperature as f32).collect();
        // Only each row's top-k candidates cross PCIe; the host draws from
        // them exactly as from its own sorted, truncated list.
        let cands = out.ops.top_k_candidates(&rows, &temps, k)?;
        for ((i, mut c), p) in topk.into_iter().zip(cands).zip(params) {
            c.truncate(p.top_k);
            if c.is_empty() {
                host.push(i); // no finite logit: the host sampler's fallback
            } else {
                picks[i] = Some(Picked::Candidates(c));
            }
        }
    }
    if !host.is_empty() {
        let rows = select(&logits, host.iter().map(|&i| row(i)).collect())?;
        for (i, r) in host.into_iter().zip(rows.to_vec2::<f32>()?) {
            picks[i] = Some(Picked::Logits(r));
        }
    }
    Ok(picks)
}

/// The logits to pick from: `out.logits` with, appended, the masked rows of
/// the constrained sampling chunks (allowed tokens keep their logit
/// exactly, the others get [`BLOCKED`] added: never picked, probability 0),
/// and per chunk the row of its masked copy. The masks travel as f16 biases
/// (0 or `BLOCKED`) and are added in f32 on the device.
fn masked(
    out: &StepLogits,
    plan: &StepPlan,
    sched: &Scheduler,
) -> Result<(Tensor, Vec<Option<u32>>)> {
    let mut at = vec![None; plan.chunks.len()];
    let mut rows = Vec::new();
    let mut bytes = Vec::new();
    let (base, vocab) = out.logits.dims2()?;
    for (i, (c, &(first, n))) in plan.chunks.iter().zip(&out.spans).enumerate() {
        let mask = sched
            .request(c.seq)
            .guide
            .as_ref()
            .and_then(|g| g.allowed.as_ref());
        if let (Some(mask), true) = (mask, c.samples && n > 0) {
            at[i] = Some((base + rows.len()) as u32);
            rows.push((first + n - 1) as u32);
            bytes.extend_from_slice(mask);
        }
    }
    if rows.is_empty() {
        return Ok((out.logits.clone(), at));
    }
    let n = rows.len();
    let sel = select(&out.logits, rows)?;
    let bias: Vec<half::f16> = bytes
        .iter()
        .map(|&a| if a == 1 { half::f16::ZERO } else { BLOCKED })
        .collect();
    let bias = Tensor::from_vec(bias, (n, vocab), sel.device())?.to_dtype(DType::F32)?;
    let masked = (sel + bias)?;
    Ok((Tensor::cat(&[&out.logits, &masked], 0)?, at))
}

/// What a blocked token's logit gets added: f16's lowest, far below any
/// logit (exp underflows to 0 against any allowed one).
const BLOCKED: half::f16 = half::f16::MIN;

/// Rows of a logits tensor, on its device.
pub(super) fn select(logits: &Tensor, rows: Vec<u32>) -> Result<Tensor> {
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, logits.device())?;
    Ok(logits.index_select(&idx, 0)?)
}
