//! Log-probabilities under the model's own distribution (the raw logits,
//! before temperature, top-k, top-p, penalties and masks), computed on the
//! logits' device: per row only the log-normalizer, the chosen token's
//! logit and the k best logits cross to the host.

use super::pick::select;
use super::runner::StepLogits;
use crate::backend::Ops;
use crate::output::TokenLogprobs;
use crate::scheduler::{RequestKind, Scheduler, SeqId, StepPlan};
use crate::Result;
use candle_core::Tensor;

/// `log sum exp` of each row of `[rows, vocab]` (f32) over its finite
/// logits, through the backend's per-row normaliser (`Ops::row_norms`:
/// on CUDA one block per row, each thread's share of the row and the
/// shares' f64 sum in a fixed order). A row's value does not depend on how
/// many rows share the call or where it sits among them, which the
/// batch-invariant mode needs: candle's f32 row sum groups a row's values
/// by the row's 16-byte alignment in the tensor, so with a vocabulary of
/// 32,002 odd and even rows summed in different orders.
fn log_normalizers(ops: &dyn Ops, rows: &Tensor) -> Result<Vec<f64>> {
    let ones = vec![1.0; rows.dim(0)?];
    Ok(ops
        .row_norms(rows, &ones)?
        .into_iter()
        .map(|(max, sum)| max as f64 + sum.ln())
        .collect())
}

/// The log-probability of `tokens[i]` under row `rows[i]` of `logits`.
pub fn token_logprobs(
    ops: &dyn Ops,
    logits: &Tensor,
    rows: Vec<u32>,
    tokens: Vec<u32>,
) -> Result<Vec<f32>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let sel = select(logits, rows)?;
    let n = tokens.len();
    let tok = Tensor::from_vec(tokens, (n, 1), sel.device())?;
    let chosen = sel.gather(&tok, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let lse = log_normalizers(ops, &sel)?;
    Ok(chosen
        .iter()
        .zip(lse)
        .map(|(&c, l)| (c as f64 - l) as f32)
        .collect())
}

/// Each row's `k` largest `(token, logit)`, largest first (ties: lower
/// id first): on the device where the backend picks top-k there, else
/// from the host copy of the rows (the CPU, whose rows are host memory).
fn top_logits(ops: &dyn Ops, rows: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    if k <= ops.device_top_k_max() {
        let ones = vec![1.0; rows.dim(0)?];
        return ops.top_k_candidates(rows, &ones, k);
    }
    Ok(rows
        .to_vec2::<f32>()?
        .iter()
        .map(|r| host_top(r, k))
        .collect())
}

/// The `k` largest `(token, logit)` of a row, largest first, ties by id.
pub fn host_top(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    // The device's order: f32 total order (-0.0 below 0.0), ties by id,
    // non-finite values skipped.
    let better = |a: &(u32, f32), b: &(u32, f32)| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)).is_gt();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in row.iter().enumerate() {
        if !v.is_finite() {
            continue;
        }
        let c = (i as u32, v);
        if top.len() == k && !better(&c, &top[k - 1]) {
            continue;
        }
        let at = top.iter().position(|t| better(&c, t)).unwrap_or(top.len());
        top.insert(at, c);
        top.truncate(k);
    }
    top
}

/// Appends, for every generation request that sampled a token in this
/// step and asks for log-probabilities (its own `logprobs`, else the job's
/// `k` when positive), that token's log-probability and its k most likely
/// tokens'.
pub fn record_sampled(
    sched: &mut Scheduler,
    plan: &StepPlan,
    out: &StepLogits,
    job_k: usize,
) -> Result<()> {
    let mut rows = Vec::new();
    let mut seqs: Vec<(SeqId, usize)> = Vec::new();
    for (c, &(first, n)) in plan.chunks.iter().zip(&out.spans) {
        let req = sched.request(c.seq);
        let k = req.params.logprobs.or((job_k > 0).then_some(job_k));
        if let (Some(k), true) = (k, c.samples && n > 0 && req.kind == RequestKind::Generate) {
            rows.push((first + n - 1) as u32);
            seqs.push((c.seq, k));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let sel = select(&out.logits, rows)?;
    let lse = log_normalizers(out.ops, &sel)?;
    let tokens: Vec<u32> = seqs
        .iter()
        .map(|&(s, _)| *sched.tokens(s).last().expect("a sampled token"))
        .collect();
    let n = tokens.len();
    let tok = Tensor::from_vec(tokens, (n, 1), sel.device())?;
    let chosen = sel.gather(&tok, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let kmax = seqs.iter().map(|s| s.1).max().unwrap_or(0);
    let top = match kmax {
        0 => vec![Vec::new(); n],
        k => top_logits(out.ops, &sel, k)?,
    };
    for (i, (s, k)) in seqs.into_iter().enumerate() {
        let lp = sched
            .request_mut(s)
            .logprobs
            .get_or_insert_with(TokenLogprobs::default);
        let logprob = |l: f32| (l as f64 - lse[i]) as f32;
        lp.chosen.push(logprob(chosen[i]));
        lp.top.push(
            top[i]
                .iter()
                .take(k)
                .map(|&(t, l)| (t, logprob(l)))
                .collect(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_top_keeps_the_k_largest_in_order_with_ties_by_id() {
        let row = [0.5, 2.0, -1.0, 2.0, 3.0, 0.5];
        assert_eq!(host_top(&row, 3), vec![(4, 3.0), (1, 2.0), (3, 2.0)]);
        assert_eq!(host_top(&row, 1), vec![(4, 3.0)]);
        assert_eq!(host_top(&row, 10).len(), 6);
        // As the device: -0.0 below 0.0 whatever the ids; no -inf or NaN.
        let row = [-0.0, f32::NEG_INFINITY, 0.0, f32::NAN, -0.0];
        assert_eq!(host_top(&row, 5), vec![(2, 0.0), (0, -0.0), (4, -0.0)]);
    }

    #[test]
    fn token_logprobs_are_the_log_softmax() {
        let logits = Tensor::new(
            &[[1.0f32, 2.0, 3.0], [0.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let got = token_logprobs(
            crate::backend::ops_for(&candle_core::Device::Cpu, candle_core::DType::F32).unwrap(),
            &logits,
            vec![0, 1],
            vec![2, 1],
        )
        .unwrap();
        let want0 = crate::scoring::token_logprob(&[1.0, 2.0, 3.0], 2) as f32;
        assert!((got[0] - want0).abs() < 1e-6, "{got:?}");
        assert!((got[1] + 3f32.ln()).abs() < 1e-6, "{got:?}");
    }
}
