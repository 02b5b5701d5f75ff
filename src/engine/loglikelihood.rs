//! Loglikelihood mode: records scored in batches, no generation.

use super::{error_row, ms, Engine, JobSummary};
use crate::input::InputRecord;
use crate::output::ParquetSink;
use crate::Result;
use std::time::Instant;

/// A loglikelihood record waiting for its batch's forward.
struct LlItem {
    rec: InputRecord,
    t0: Instant,
    prompt: usize,
    all: Vec<u32>,
}

impl Engine {
    /// Loglikelihood mode: for each record, the summed log-probability of
    /// its continuation after its rendered prompt (no generation). Records
    /// go through the model together, up to `engine.max_batch_tokens`
    /// tokens and `engine.max_num_seqs` records per forward (a longer
    /// record runs alone); only each record's continuation rows of the
    /// logits leave the device.
    pub(super) fn run_loglikelihood(
        &self,
        input: &mut (dyn Iterator<Item = Result<InputRecord>> + Send),
        job_system: &str,
        sink: &mut ParquetSink,
    ) -> Result<JobSummary> {
        let start = Instant::now();
        let mut sum = JobSummary::default();
        let ctx = self.model.config().max_position_embeddings;
        let mut batch: Vec<LlItem> = Vec::new();
        let mut batch_tokens = 0;
        for rec in input {
            if self.stop_requested() {
                // Records of the unscored batch are not written: a resume
                // scores them.
                sum.interrupted = true;
                batch.clear();
                break;
            }
            let rec = rec?;
            let t0 = Instant::now();
            let tokens = self
                .continuation_tokens(&rec, job_system)
                .and_then(|(prompt, all)| {
                    if all.len() > ctx {
                        return Err(format!(
                            "record {}: prompt + continuation has {} tokens, the context is {ctx}",
                            rec.id,
                            all.len()
                        ));
                    }
                    Ok((prompt, all))
                });
            match tokens {
                Err(msg) => {
                    sum.records += 1;
                    sum.errors += 1;
                    sink.push(error_row(&rec, msg, 0.0, &self.defaults))?;
                }
                Ok((prompt, all)) => {
                    if !batch.is_empty()
                        && (batch_tokens + all.len() > self.sched.max_batch_tokens
                            || batch.len() >= self.sched.max_num_seqs)
                    {
                        self.score_batch(std::mem::take(&mut batch), &mut sum, sink)?;
                        batch_tokens = 0;
                    }
                    batch_tokens += all.len();
                    batch.push(LlItem {
                        rec,
                        t0,
                        prompt,
                        all,
                    });
                }
            }
        }
        if !batch.is_empty() {
            self.score_batch(batch, &mut sum, sink)?;
        }
        sink.flush()?;
        sum.wall_s = start.elapsed().as_secs_f64();
        Ok(sum)
    }

    /// One forward over a batch of loglikelihood records; writes their rows
    /// (error rows naming the record if the forward fails).
    fn score_batch(
        &self,
        batch: Vec<LlItem>,
        sum: &mut JobSummary,
        sink: &mut ParquetSink,
    ) -> Result<()> {
        let seqs: Vec<&[u32]> = batch.iter().map(|b| b.all.as_slice()).collect();
        let logits = self.model.logits_full_batch(&seqs);
        sum.steps += 1;
        let mut off = 0;
        for item in &batch {
            let len = item.all.len();
            // Rows s-1 .. len-2 predict the continuation tokens s .. len-1.
            let s = item.prompt.max(1);
            let scored = logits
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|l| {
                    if len <= s {
                        return Ok((0.0, 0));
                    }
                    let rows = l
                        .narrow(0, off + s - 1, len - s)
                        .and_then(|r| r.to_vec2::<f32>())
                        .map_err(|e| e.to_string())?;
                    Ok(crate::scoring::loglikelihood(&rows, &item.all[s - 1..], 1))
                })
                .map_err(|e| format!("record {}: {e}", item.rec.id));
            off += len;
            sum.records += 1;
            let row = match scored {
                Err(msg) => {
                    sum.errors += 1;
                    error_row(&item.rec, msg, 0.0, &self.defaults)
                }
                Ok((ll, n)) => {
                    sum.ok += 1;
                    sum.prompt_tokens += item.prompt;
                    sum.forward_tokens += len;
                    let mut row = error_row(&item.rec, String::new(), 0.0, &self.defaults);
                    row.status = "ok";
                    row.error = None;
                    row.finish_reason = crate::output::FinishReason::Scored.as_str();
                    row.prompt_tokens = item.prompt as u32;
                    row.total_ms = ms(item.t0, Instant::now());
                    row.loglikelihood = Some((ll, n as u32));
                    row
                }
            };
            sink.push(row)?;
        }
        Ok(())
    }
}
