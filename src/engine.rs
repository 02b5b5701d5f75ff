//! The step loop: admit records, schedule one mixed batch (decodes first,
//! then prefill chunks up to the token budget), one forward, sample per
//! sequence with its own RNG, emit finished records to the sink.

use crate::config::{Device, GenerationParams, JobSpec};
use crate::input::{InputRecord, PromptInput};
use crate::model::{HubSettings, Mistral, SeqChunk, SeqKvCache};
use crate::output::{FinishReason, JobMeta, OutputRow, ParquetSink};
use crate::prompt::Prompter;
use crate::sampler::{self, RecordRng};
use crate::{Error, Result};
use std::time::Instant;

/// Figures of a finished job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSummary {
    /// Rows written.
    pub records: usize,
    /// Rows with status ok.
    pub ok: usize,
    /// Rows with status error.
    pub errors: usize,
    /// Prompt tokens of ok rows.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Forward passes.
    pub steps: usize,
    /// Wall time of the generation loop.
    pub wall_s: f64,
}

/// The candle device for a configured device.
pub fn candle_device(d: Device) -> Result<candle_core::Device> {
    match d {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
            Error::Config(format!(
                "engine.device is cuda:{n} but it cannot be used ({e}); this binary needs the `cuda` feature and a GPU"
            ))
        }),
    }
}

/// A model with its prompter, ready to run records.
pub struct Engine {
    model: Mistral,
    prompter: Prompter,
    max_prompt_tokens: usize,
    max_num_seqs: usize,
    max_batch_tokens: usize,
    include_token_ids: bool,
    defaults: GenerationParams,
}

struct Seq {
    rec_id: String,
    row: u64,
    params: GenerationParams,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens of prompt + generated already in the cache.
    cache: SeqKvCache,
    rng: RecordRng,
    admitted: Instant,
    queue_ms: f64,
    first_token: Option<Instant>,
}

impl Seq {
    fn fed(&self) -> usize {
        self.cache.len()
    }
}

impl Engine {
    /// Loads the model and tokenizer named by the job.
    pub fn load(spec: &JobSpec, hub: &HubSettings) -> Result<(Self, JobMeta)> {
        let dir = crate::model::resolve_model_dir(&spec.model, hub)?;
        let device = candle_device(spec.engine.device)?;
        if spec.model.load_format == crate::config::LoadFormat::Dummy {
            return Err(Error::Config(
                "model.load_format = \"dummy\" is not implemented yet (tracked in the GPU issue)"
                    .into(),
            ));
        }
        let model = crate::model::load(&dir, spec.model.dtype.candle(), &device)?;
        let prompter = Prompter::load(&dir, &model.config().eos_token_ids)?;
        let ctx = model.config().max_position_embeddings;
        let max_prompt_tokens = match spec.engine.max_prompt_tokens {
            0 => ctx - 1,
            n => n.min(ctx - 1),
        };
        let q = model.quant();
        let meta = JobMeta {
            job_id: uuid::Uuid::new_v4().to_string(),
            model_id: spec.model.id.clone(),
            revision: spec.model.revision.clone(),
            quant_bits: q.map(|q| q.bits as i32),
            quant_group_size: q.map(|q| q.group_size.map_or(-1, |g| g as i32)),
            quant_act_order: q.map(|q| q.desc_act),
        };
        Ok((
            Self {
                model,
                prompter,
                max_prompt_tokens,
                max_num_seqs: spec.engine.max_num_seqs,
                max_batch_tokens: spec.engine.max_batch_tokens,
                include_token_ids: spec.output.include_token_ids,
                defaults: spec.generation.clone(),
            },
            meta,
        ))
    }

    /// The model.
    pub fn model(&self) -> &Mistral {
        &self.model
    }

    /// The prompter.
    pub fn prompter(&self) -> &Prompter {
        &self.prompter
    }

    /// Renders and tokenizes a record, checking its length.
    pub fn tokenize(
        &self,
        rec: &InputRecord,
        job_system: &str,
    ) -> std::result::Result<Vec<u32>, String> {
        let body = rec.body.as_ref().map_err(|e| e.clone())?;
        let messages = match &body.prompt {
            PromptInput::Messages(m) => m.clone(),
            PromptInput::Text { system, user } => {
                Prompter::messages(system.as_deref(), job_system, user)
            }
        };
        let text = self
            .prompter
            .render(&messages)
            .map_err(|e| format!("record {}: {e}", rec.id))?;
        let ids = self
            .prompter
            .encode(&text)
            .map_err(|e| format!("record {}: {e}", rec.id))?;
        if ids.len() > self.max_prompt_tokens {
            return Err(format!(
                "record {}: prompt has {} tokens, max_prompt_tokens is {}",
                rec.id,
                ids.len(),
                self.max_prompt_tokens
            ));
        }
        Ok(ids)
    }

    /// Runs every record of `input` and writes one row per record to `sink`.
    pub fn run(
        &self,
        input: &mut dyn Iterator<Item = Result<InputRecord>>,
        job_system: &str,
        sink: &mut ParquetSink,
    ) -> Result<JobSummary> {
        let start = Instant::now();
        let mut sum = JobSummary::default();
        let mut active: Vec<Seq> = Vec::new();
        let mut exhausted = false;
        let ctx = self.model.config().max_position_embeddings;
        loop {
            // Admit.
            while !exhausted && active.len() < self.max_num_seqs {
                let Some(rec) = input.next() else {
                    exhausted = true;
                    break;
                };
                let rec = rec?;
                let now = Instant::now();
                let queue_ms = ms(start, now);
                match self.tokenize(&rec, job_system) {
                    Err(msg) => {
                        sum.errors += 1;
                        sum.records += 1;
                        tracing::warn!(record = %rec.id, "{msg}");
                        sink.push(error_row(&rec, msg, queue_ms, &self.defaults))?;
                    }
                    Ok(prompt) => {
                        let params = rec
                            .body
                            .as_ref()
                            .map_or_else(|_| self.defaults.clone(), |b| b.params.clone());
                        active.push(Seq {
                            rng: RecordRng::new(params.seed, &rec.id),
                            rec_id: rec.id,
                            row: rec.row,
                            params,
                            prompt,
                            generated: Vec::new(),
                            cache: self.model.new_cache(),
                            admitted: now,
                            queue_ms,
                            first_token: None,
                        });
                    }
                }
            }
            if active.is_empty() {
                break;
            }
            // Schedule: decodes first, then prefill chunks within the budget.
            let mut budget = self.max_batch_tokens;
            let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (seq index, from, len)
            for (i, s) in active.iter().enumerate() {
                if s.fed() >= s.prompt.len() && budget > 0 {
                    plan.push((i, s.fed(), 1));
                    budget -= 1;
                }
            }
            for (i, s) in active.iter().enumerate() {
                if s.fed() < s.prompt.len() && budget > 0 {
                    let n = (s.prompt.len() - s.fed()).min(budget);
                    plan.push((i, s.fed(), n));
                    budget -= n;
                }
            }
            let tokens: Vec<Vec<u32>> = plan
                .iter()
                .map(|&(i, from, n)| {
                    let s = &active[i];
                    if from < s.prompt.len() {
                        s.prompt[from..from + n].to_vec()
                    } else {
                        vec![*s.generated.last().expect("decode follows a sampled token")]
                    }
                })
                .collect();
            let logits = {
                let mut caches: Vec<Option<&mut SeqKvCache>> =
                    active.iter_mut().map(|s| Some(&mut s.cache)).collect();
                let mut chunks: Vec<SeqChunk<'_>> = plan
                    .iter()
                    .zip(&tokens)
                    .map(|(&(i, from, _), t)| SeqChunk {
                        tokens: t,
                        start_pos: from,
                        cache: caches[i].take().expect("one chunk per sequence"),
                    })
                    .collect();
                self.model.forward(&mut chunks, false)?
            };
            sum.steps += 1;
            let logits = logits.to_vec2::<f32>()?;
            let now = Instant::now();
            let mut finished: Vec<(usize, FinishReason)> = Vec::new();
            for (row, &(i, _, _)) in logits.into_iter().zip(&plan) {
                let s = &mut active[i];
                if s.fed() < s.prompt.len() {
                    continue; // mid-prefill: no token yet
                }
                let mut row = row;
                let mut seen = s.prompt.clone();
                seen.extend_from_slice(&s.generated);
                let tok = sampler::sample(&mut row, &seen, &s.params, &mut s.rng);
                s.generated.push(tok);
                s.first_token.get_or_insert(now);
                if let Some(r) = self.finish_reason(s, tok, ctx)? {
                    finished.push((i, r));
                }
            }
            finished.sort_by_key(|f| std::cmp::Reverse(f.0));
            for (i, reason) in finished {
                let s = active.swap_remove(i);
                let row = self.ok_row(s, reason, now)?;
                sum.records += 1;
                sum.ok += 1;
                sum.prompt_tokens += row.prompt_tokens as usize;
                sum.completion_tokens += row.completion_tokens as usize;
                sink.push(row)?;
            }
        }
        sink.flush()?;
        sum.wall_s = start.elapsed().as_secs_f64();
        Ok(sum)
    }

    fn finish_reason(&self, s: &Seq, tok: u32, ctx: usize) -> Result<Option<FinishReason>> {
        if !s.params.ignore_eos && self.prompter.stop_ids().contains(&tok) {
            return Ok(Some(FinishReason::Stop));
        }
        if !s.params.stop.is_empty() {
            let text = self.prompter.decode(&s.generated)?;
            if s.params.stop.iter().any(|st| text.contains(st.as_str())) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if s.generated.len() >= s.params.max_new_tokens || s.prompt.len() + s.generated.len() >= ctx
        {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn ok_row(&self, s: Seq, reason: FinishReason, now: Instant) -> Result<OutputRow> {
        let mut text = self.prompter.decode(&s.generated)?;
        if let Some(cut) = s
            .params
            .stop
            .iter()
            .filter_map(|st| text.find(st.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        Ok(OutputRow {
            id: s.rec_id,
            input_row: s.row,
            completion: Some(text),
            finish_reason: reason.as_str(),
            status: "ok",
            error: None,
            prompt_tokens: s.prompt.len() as u32,
            completion_tokens: s.generated.len() as u32,
            cached_prompt_tokens: 0,
            max_new_tokens: s.params.max_new_tokens as u32,
            temperature: s.params.temperature,
            top_p: s.params.top_p,
            top_k: s.params.top_k as u32,
            repetition_penalty: s.params.repetition_penalty,
            seed: s.params.seed,
            queue_ms: s.queue_ms,
            ttft_ms: s.first_token.map(|t| ms(s.admitted, t)),
            total_ms: ms(s.admitted, now),
            completion_token_ids: if self.include_token_ids {
                s.generated
            } else {
                Vec::new()
            },
        })
    }
}

fn ms(a: Instant, b: Instant) -> f64 {
    b.duration_since(a).as_secs_f64() * 1000.0
}

/// The output row of a record that could not run.
pub fn error_row(
    rec: &InputRecord,
    msg: String,
    queue_ms: f64,
    defaults: &GenerationParams,
) -> OutputRow {
    let p = rec.body.as_ref().map_or(defaults, |b| &b.params);
    OutputRow {
        id: rec.id.clone(),
        input_row: rec.row,
        completion: None,
        finish_reason: FinishReason::Error.as_str(),
        status: "error",
        error: Some(msg),
        prompt_tokens: 0,
        completion_tokens: 0,
        cached_prompt_tokens: 0,
        max_new_tokens: p.max_new_tokens as u32,
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k as u32,
        repetition_penalty: p.repetition_penalty,
        seed: p.seed,
        queue_ms,
        ttft_ms: None,
        total_ms: 0.0,
        completion_token_ids: Vec::new(),
    }
}
