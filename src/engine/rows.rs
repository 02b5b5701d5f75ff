//! The row builder: a finished request (or a record that could not run)
//! becomes its output row.

use crate::config::GenerationParams;
use crate::input::{InputRecord, RecordError};
use crate::output::{FinishReason, OutputRow, RowStatus};
use crate::prompt::Decoder;
use crate::scheduler::{RecordRef, Request};
use crate::scoring::Scorer;
use crate::Result;
use std::time::Instant;

/// What rows need beyond the request itself.
pub struct RowBuilder<'a> {
    /// Completion text from ids.
    pub decoder: &'a dyn Decoder,
    /// Per-record scores against the reference.
    pub scorer: &'a Scorer,
    /// Write `completion_token_ids`.
    pub include_token_ids: bool,
    /// Keep the stop string that ended a completion.
    pub include_stop_str: bool,
}

impl RowBuilder<'_> {
    /// The row of a finished request.
    pub fn finished(&self, mut req: Request, reason: FinishReason) -> Result<OutputRow> {
        let now = Instant::now();
        let admitted = req.timings.admitted.unwrap_or(now);
        let mut row = base_row(&req.record, &req.params);
        row.sample_index = req.sample_index;
        row.status = RowStatus::Ok;
        row.finish_reason = reason;
        row.prompt_tokens = req.prompt_len() as u32;
        row.cached_prompt_tokens = req.cached_prompt_tokens() as u32;
        row.queue_ms = req.timings.queue_ms;
        row.total_ms = ms(admitted, now);
        if reason == FinishReason::Scored {
            let sum: f64 = req.token_logprobs.iter().map(|l| l.unwrap_or(0.0)).sum();
            row.loglikelihood = Some((sum, req.token_logprobs.len() as u32));
            return Ok(row);
        }
        let generated = req.generated();
        let mut text = self.decoder.decode(generated)?;
        if reason == FinishReason::Stop && !req.params.stop.is_empty() {
            self.cut_at_stop(&mut text, &req)?;
        }
        let scores = self.scorer.score(&text, req.record.reference.as_deref());
        row.scores = scores.values.iter().map(|v| v.1).collect();
        row.extracted = scores.extracted;
        row.completion = Some(text);
        row.completion_tokens = generated.len() as u32;
        row.ttft_ms = req.timings.first_token.map(|t| ms(admitted, t));
        if self.include_token_ids {
            row.completion_token_ids = generated.to_vec();
        }
        row.schema_valid = req
            .guide
            .as_mut()
            .map(|g| reason == FinishReason::Stop && g.is_complete());
        row.logprobs = req.logprobs;
        row.prompt_logprobs = req.prompt_logprobs;
        Ok(row)
    }
}

impl RowBuilder<'_> {
    /// Cuts the completion at the first stop string that ends after the
    /// first `min_new_tokens` tokens (the one that stopped it), before it
    /// or, with `include_stop_str`, after it.
    fn cut_at_stop(&self, text: &mut String, req: &Request) -> Result<()> {
        let p = &req.params;
        let min = p.min_new_tokens.min(req.generated().len());
        let early = match min {
            0 => 0,
            n => self.decoder.decode(&req.generated()[..n])?.len(),
        };
        let found = p
            .stop
            .iter()
            .filter_map(|s| {
                text.match_indices(s.as_str())
                    .find(|(i, _)| i + s.len() > early)
                    .map(|(i, _)| (i, i + s.len()))
            })
            .min();
        if let Some((start, end)) = found {
            text.truncate(if self.include_stop_str { end } else { start });
        }
        Ok(())
    }
}

/// The row of a record that could not run.
pub fn error_row(
    rec: &InputRecord,
    err: &RecordError,
    queue_ms: f64,
    defaults: &GenerationParams,
) -> OutputRow {
    let params = rec.body.as_ref().map_or(defaults, |b| &b.params);
    let record = RecordRef {
        id: rec.id.clone(),
        row: rec.row,
        reference: rec.body.as_ref().ok().and_then(|b| b.reference.clone()),
        passthrough: rec.passthrough.clone(),
    };
    let mut row = base_row(&record, params);
    row.error = Some(err.to_string());
    row.queue_ms = queue_ms;
    row
}

/// A row with the record's identity and parameters, as an error until
/// filled in.
fn base_row(record: &RecordRef, p: &GenerationParams) -> OutputRow {
    OutputRow {
        reference: record.reference.clone(),
        scores: Vec::new(),
        extracted: None,
        loglikelihood: None,
        id: record.id.clone(),
        input_row: record.row,
        sample_index: 0,
        completion: None,
        finish_reason: FinishReason::Error,
        status: RowStatus::Error,
        error: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_prompt_tokens: 0,
        max_new_tokens: p.max_new_tokens as u32,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
        queue_ms: 0.0,
        ttft_ms: None,
        total_ms: 0.0,
        completion_token_ids: Vec::new(),
        passthrough: record.passthrough.clone(),
        logprobs: None,
        prompt_logprobs: None,
        schema_valid: None,
    }
}

/// Milliseconds from `a` to `b`.
pub fn ms(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1000.0
}
