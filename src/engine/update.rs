//! The scheduler update: a step's picks become tokens of their requests,
//! scored rows become log-probabilities, and the requests that are done
//! are named with why.

use super::pick::Picked;
use super::runner::StepLogits;
use crate::config::GenerationParams;
use crate::output::FinishReason;
use crate::prompt::Decoder;
use crate::sampler;
use crate::scheduler::{Request, RequestKind, Scheduler, SeqId, StepPlan};
use crate::{Error, Result};
use rayon::prelude::*;
use std::time::Instant;

/// When a generation ends: stop tokens, stop strings, length, context.
pub struct StopRule<'a> {
    /// Decodes the tail for stop strings; gives the stop token ids.
    pub decoder: &'a dyn Decoder,
    /// The model's context length.
    pub ctx: usize,
}

impl StopRule<'_> {
    /// Why `req` (whose newest token is `tok`) is finished, if it is.
    pub fn check(&self, req: &Request, tok: u32) -> Result<Option<FinishReason>> {
        let p = &req.params;
        let generated = req.generated();
        // Before `min_new_tokens`, only length and context end a completion.
        let may_stop = generated.len() > p.min_new_tokens;
        if may_stop && self.is_stop_token(p, tok) {
            return Ok(Some(FinishReason::Stop));
        }
        if may_stop && !p.stop.is_empty() {
            // Checked every step, so a stop string can only end in the newest
            // token: decoding a tail window that covers the longest stop string
            // (a character takes at most 4 byte-fallback tokens) plus margin
            // for the decoder's handling of the window's first token is enough.
            let longest = p.stop.iter().map(|s| s.chars().count()).max();
            let window = 4 * longest.unwrap_or(0) + 4;
            let tail = &generated[generated.len().saturating_sub(window)..];
            let text = self.decoder.decode(tail)?;
            if p.stop.iter().any(|s| text.contains(s.as_str())) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if self.length_reached(req, 0) {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// Whether `req` is at its length limit (`max_new_tokens` or the
    /// context) once `ahead` more tokens are appended.
    pub fn length_reached(&self, req: &Request, ahead: usize) -> bool {
        req.generated().len() + ahead >= req.params.max_new_tokens
            || req.tokens().len() + ahead >= self.ctx
    }

    /// EOS (unless ignored) or one of the record's `stop_token_ids`.
    pub fn is_stop_token(&self, p: &GenerationParams, tok: u32) -> bool {
        (!p.ignore_eos && self.decoder.stop_ids().contains(&tok)) || p.stop_token_ids.contains(&tok)
    }

    /// The tokens that would end `req` too early (before
    /// `min_new_tokens`): none from then on. The pick masks them (-inf) in
    /// a copy of the row that every route, the host's too, reads
    /// (`pick::masked`).
    pub fn early_stops(&self, req: &Request) -> Vec<u32> {
        let p = &req.params;
        if req.generated().len() >= p.min_new_tokens {
            return Vec::new();
        }
        let eos = self.decoder.stop_ids().iter().filter(|_| !p.ignore_eos);
        eos.chain(&p.stop_token_ids).copied().collect()
    }
}

/// Applies a step's picks and scored rows to the requests; returns the
/// requests that finished in this step, in chunk order.
pub fn apply(
    sched: &mut Scheduler,
    plan: &StepPlan,
    picks: Vec<Option<Picked>>,
    stops: &StopRule<'_>,
) -> Result<Vec<(SeqId, FinishReason)>> {
    let now = Instant::now();
    let mut finished = Vec::new();
    let picks = prepare_host_rows(sched, plan, picks);
    for (c, pick) in plan.chunks.iter().zip(picks) {
        if !c.samples {
            continue; // mid-prefill chunk: nothing to do yet
        }
        if sched.request(c.seq).kind == RequestKind::Score {
            finished.push((c.seq, FinishReason::Scored));
            continue;
        }
        let req = sched.request_mut(c.seq);
        let (params, rng) = req.sampling_parts();
        let tok = match pick {
            Some(Picked::Token(t)) => t,
            Some(Picked::Prepared(p)) => sampler::draw(&p, params, rng),
            Some(Picked::Candidates(cand)) => sampler::sample_sorted(&cand, params, rng),
            Some(Picked::Nucleus(cand, sum)) => sampler::sample_nucleus(&cand, sum, params, rng),
            Some(Picked::Drawn(t)) => {
                rng.next_f64(); // the uniform the device drew with
                t
            }
            Some(Picked::Logits(_)) => unreachable!("prepare_host_rows prepares every host row"),
            None => unreachable!("every sampling chunk of a generation request has a pick"),
        };
        req.timings.first_token.get_or_insert(now);
        let guided = req.guide.as_mut().map(|g| {
            let was = g.failed.is_some();
            g.consume(tok);
            if let (false, Some(e)) = (was, &g.failed) {
                tracing::warn!(record = %req.record.id, token = tok, "the constraint refused a token, the completion ends: {e}");
            }
            g.is_done()
        });
        sched.push_token(c.seq, tok);
        let reason = match stops.check(sched.request(c.seq), tok)? {
            // The grammar is complete (or refused a token): nothing but EOS
            // could follow.
            None if guided == Some(true) => Some(FinishReason::Stop),
            r => r,
        };
        if let Some(reason) = reason {
            finished.push((c.seq, reason));
        }
    }
    Ok(finished)
}

/// The host rows' sampling work before their draws (rows whose early stops
/// the pick already masked): [`sampler::prepare`] (penalty,
/// temperature, top-k's cut, top-p's sorted candidates) of every row at
/// once on the rayon pool; the draws then take each record's uniform in
/// chunk order, so a record's stream is the same as row by row.
fn prepare_host_rows(
    sched: &Scheduler,
    plan: &StepPlan,
    mut picks: Vec<Option<Picked>>,
) -> Vec<Option<Picked>> {
    let mut work: Vec<(usize, Vec<f32>, &Request)> = Vec::new();
    for (i, (c, pick)) in plan.chunks.iter().zip(picks.iter_mut()).enumerate() {
        let req = sched.request(c.seq);
        if !c.samples || req.kind == RequestKind::Score {
            continue;
        }
        if let Some(Picked::Logits(row)) = pick {
            work.push((i, std::mem::take(row), req));
        }
    }
    let done: Vec<(usize, sampler::Prepared)> = work
        .into_par_iter()
        .map(|(i, mut row, req)| (i, sampler::prepare(&mut row, req.tokens(), &req.params)))
        .collect();
    for (i, p) in done {
        picks[i] = Some(Picked::Prepared(p));
    }
    picks
}

/// Stores the log-probabilities of the known tokens whose rows ran in this
/// step: scoring requests' continuations and, with `prompt_logprobs`,
/// generation requests' prompts.
pub fn record_known(sched: &mut Scheduler, plan: &StepPlan, out: &StepLogits) -> Result<()> {
    record_scores(sched, plan, out)?;
    record_prompts(sched, plan, out)
}

/// Prompt log-probabilities (on the device: one value per row crosses).
fn record_prompts(sched: &mut Scheduler, plan: &StepPlan, out: &StepLogits) -> Result<()> {
    let (mut rows, mut tokens, mut at) = (Vec::new(), Vec::new(), Vec::new());
    for (c, &(first, _)) in plan.chunks.iter().zip(&out.spans) {
        let req = sched.request(c.seq);
        if req.kind != RequestKind::Generate || req.prompt_logprobs.is_none() {
            continue;
        }
        let (from, to) = req.logit_rows(c.start, c.len);
        for (r, pos) in (c.start + from..c.start + to).enumerate() {
            if pos + 1 < req.prompt_len() {
                rows.push((first + r) as u32);
                tokens.push(req.tokens()[pos + 1]);
                at.push((c.seq, pos + 1));
            }
        }
    }
    let lps = super::logprobs::token_logprobs(out.ops, &out.logits, rows, tokens)?;
    let mut touched = Vec::new();
    for ((seq, pos), lp) in at.into_iter().zip(lps) {
        if let Some(v) = sched.request_mut(seq).prompt_logprobs.as_mut() {
            v[pos] = Some(lp);
        }
        if touched.last() != Some(&seq) {
            touched.push(seq);
        }
    }
    // Blocks now fully scored serve later prompts with the same prefix.
    for seq in touched {
        sched.keep_prompt_logprobs(seq);
    }
    Ok(())
}

/// Stores the log-probability of each continuation token whose row ran in
/// this step (rows cross to the host once, for all scoring chunks).
fn record_scores(sched: &mut Scheduler, plan: &StepPlan, out: &StepLogits) -> Result<()> {
    let mut rows = Vec::new();
    let mut wanted = Vec::new(); // (chunk, first row of the chunk's span)
    for (i, c) in plan.chunks.iter().enumerate() {
        let (first, n) = out.spans[i];
        if n > 0 && sched.request(c.seq).kind == RequestKind::Score {
            wanted.push(i);
            rows.extend((first..first + n).map(|r| r as u32));
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let host = super::pick::select(&out.logits, rows)?.to_vec2::<f32>()?;
    let mut host = host.into_iter();
    for i in wanted {
        let c = plan.chunks[i];
        let req = sched.request_mut(c.seq);
        let (from, to) = req.logit_rows(c.start, c.len);
        let first_scored = req.prompt_len().max(1);
        for pos in c.start + from..c.start + to {
            let row = host.next().ok_or_else(|| {
                Error::Engine("the step returned fewer scored rows than asked".into())
            })?;
            let lp = crate::scoring::token_logprob(&row, req.tokens()[pos + 1]);
            req.token_logprobs[pos + 1 - first_scored] = Some(lp);
        }
    }
    Ok(())
}
