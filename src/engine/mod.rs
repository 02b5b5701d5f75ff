//! The step loop: admit records, schedule one mixed batch (decodes first,
//! then prefill chunks up to the token budget), one forward, sample per
//! sequence with its own RNG, emit finished records to the sink.

use crate::config::{Device, GenerationParams, JobSpec};
use crate::input::{InputRecord, PromptInput};
use crate::model::{HubSettings, LoadOptions, Mistral, QuantConfig, SeqChunk};
use crate::output::{FinishReason, JobMeta, OutputRow, ParquetSink};
use crate::prompt::Prompter;
use crate::sampler::{self, RecordRng};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};
use crate::{Error, Result};
use std::collections::HashMap;
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
    /// Prompt tokens served from the prefix cache (preemption recomputes included).
    pub prefix_hit_tokens: usize,
    /// Sum of rows' `cached_prompt_tokens`.
    pub cached_prompt_tokens: usize,
    /// Preemptions by recompute.
    pub preemptions: usize,
    /// Most device memory in use at any step (CUDA; 0 on the CPU).
    pub peak_device_bytes: usize,
    /// Tokens run through the model (prefill chunks, recomputes, decodes).
    pub forward_tokens: usize,
    /// The run stopped early on request (a signal); in-flight records were
    /// dropped unwritten and run again on resume.
    pub interrupted: bool,
}

/// The candle device for a configured device.
pub fn candle_device(d: Device) -> Result<candle_core::Device> {
    match d {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => crate::cuda::single_stream_device(n).map_err(|e| {
            Error::Config(format!("engine.device is cuda:{n} but it cannot be used ({e})"))
        }),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(n) => candle_core::Device::new_cuda(n).map_err(|e| {
            Error::Config(format!(
                "engine.device is cuda:{n} but it cannot be used ({e}); this binary needs the `cuda` feature and a GPU"
            ))
        }),
    }
}

mod loglikelihood;

/// A model with its prompter, ready to run records.
pub struct Engine {
    model: Mistral,
    prompter: Prompter,
    max_prompt_tokens: usize,
    sched: SchedulerConfig,
    include_token_ids: bool,
    defaults: GenerationParams,
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    scorer: crate::scoring::Scorer,
    loglikelihood: bool,
}

/// A sampled token, or the logits to sample it from on the host.
enum Picked {
    Token(u32),
    Logits(Vec<f32>),
    /// The GPU's top-k `(token, logit / t)` in the host sampler's order.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Candidates(Vec<(u32, f32)>),
}

#[cfg(feature = "cuda")]
use crate::cuda::TOPK_MAX;
#[cfg(not(feature = "cuda"))]
const TOPK_MAX: usize = 64;

/// A record read and tokenized ahead of the step loop.
type Prepared = (InputRecord, std::result::Result<Vec<u32>, String>);

struct Seq {
    rec_id: String,
    reference: Option<String>,
    row: u64,
    params: GenerationParams,
    prompt_len: usize,
    rng: RecordRng,
    admitted: Option<Instant>,
    queue_ms: f64,
    first_token: Option<Instant>,
}

impl Engine {
    /// Loads the model and tokenizer named by the job. With
    /// `load_format = "dummy"` the weights are random (config, tokenizer and,
    /// unless `model.dummy_quant` says otherwise, quantization still come
    /// from the model directory).
    pub fn load(spec: &JobSpec, hub: &HubSettings) -> Result<(Self, JobMeta)> {
        let dir = crate::model::resolve_model_dir(&spec.model, hub)?;
        let device = candle_device(spec.engine.device)?;
        let opts = LoadOptions {
            dtype: spec.model.dtype.candle(),
            device,
            gptq_mode: spec.engine.gptq_kernel,
            fused_max_m: spec.engine.gptq_fused_max_m,
        };
        let model = match spec.model.load_format {
            crate::config::LoadFormat::Auto => crate::model::load(&dir, &opts)?,
            crate::config::LoadFormat::Dummy => {
                let (cfg, quant) = crate::model::read_meta(&dir)?;
                let quant = match &spec.model.dummy_quant {
                    Some(name) => QuantConfig::from_short_name(name)?,
                    None => quant,
                };
                Mistral::dummy(&cfg, quant.as_ref(), &opts, 0x5eed)?
            }
        };
        let prompter = Prompter::load(&dir, &model.config().eos_token_ids)?;
        Self::assemble(model, prompter, spec)
    }

    /// An engine over an already built model and prompter.
    pub fn assemble(model: Mistral, prompter: Prompter, spec: &JobSpec) -> Result<(Self, JobMeta)> {
        let ctx = model.config().max_position_embeddings;
        let max_prompt_tokens = match spec.engine.max_prompt_tokens {
            0 => ctx - 1,
            n => n.min(ctx - 1),
        };
        let per_block = model.kv_bytes_per_block(spec.engine.block_size);
        let num_blocks = match spec.engine.num_blocks {
            // Auto: what max_num_seqs full-context sequences need, within the memory budget.
            0 => {
                let want =
                    spec.engine.max_num_seqs * ctx.min(8192).div_ceil(spec.engine.block_size);
                let budget = spec.engine.kv_cache_mib * 1024 * 1024 / per_block;
                want.min(budget).max(1)
            }
            n => n,
        };
        tracing::info!(
            num_blocks,
            block_size = spec.engine.block_size,
            mib = (num_blocks * per_block) >> 20,
            "kv cache"
        );
        let q = model.quant();
        let meta = JobMeta {
            job_id: uuid::Uuid::new_v4().to_string(),
            model_id: spec.model.id.clone(),
            revision: spec.model.revision.clone(),
            quant_bits: q.map(|q| q.bits as i32),
            quant_group_size: q.map(|q| q.group_size.map_or(-1, |g| g as i32)),
            quant_act_order: q.map(|q| q.desc_act),
            metrics: spec.scoring.metrics.clone(),
            loglikelihood: spec.scoring.loglikelihood,
        };
        Ok((
            Self {
                model,
                prompter,
                max_prompt_tokens,
                sched: SchedulerConfig {
                    max_num_seqs: spec.engine.max_num_seqs,
                    max_batch_tokens: spec.engine.max_batch_tokens,
                    num_blocks,
                    block_size: spec.engine.block_size,
                    prefix_caching: spec.engine.prefix_caching,
                },
                include_token_ids: spec.output.include_token_ids,
                defaults: spec.generation.clone(),
                stop: None,
                scorer: crate::scoring::Scorer::new(&spec.scoring),
                loglikelihood: spec.scoring.loglikelihood,
            },
            meta,
        ))
    }

    /// Stops the run (after the current step, finished records flushed)
    /// once `flag` is set.
    pub fn set_stop_flag(&mut self, flag: std::sync::Arc<std::sync::atomic::AtomicBool>) {
        self.stop = Some(flag);
    }

    /// Whether the stop flag (a signal) is set.
    fn stop_requested(&self) -> bool {
        self.stop
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The model.
    pub fn model(&self) -> &Mistral {
        &self.model
    }

    /// The prompter.
    pub fn prompter(&self) -> &Prompter {
        &self.prompter
    }

    /// A record's prompt through the chat template.
    fn render(&self, rec: &InputRecord, job_system: &str) -> std::result::Result<String, String> {
        let body = rec.body.as_ref().map_err(|e| e.clone())?;
        let messages = match &body.prompt {
            PromptInput::Messages(m) => m.clone(),
            PromptInput::Text { system, user } => {
                Prompter::messages(system.as_deref(), job_system, user)
            }
        };
        self.prompter
            .render(&messages)
            .map_err(|e| format!("record {}: {e}", rec.id))
    }

    /// Renders and tokenizes a record, checking its length.
    pub fn tokenize(
        &self,
        rec: &InputRecord,
        job_system: &str,
    ) -> std::result::Result<Vec<u32>, String> {
        let text = self.render(rec, job_system)?;
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
        input: &mut (dyn Iterator<Item = Result<InputRecord>> + Send),
        job_system: &str,
        sink: &mut ParquetSink,
    ) -> Result<JobSummary> {
        if self.loglikelihood {
            return self.run_loglikelihood(input, job_system, sink);
        }
        let capacity = self.sched.num_blocks * self.sched.block_size;
        // Reading and tokenizing upcoming records overlaps with model work.
        std::thread::scope(|scope| {
            let (tx, rx) =
                std::sync::mpsc::sync_channel::<Result<Prepared>>(4 * self.sched.max_num_seqs);
            scope.spawn(move || {
                for rec in input {
                    let item = rec.map(|rec| {
                        let tokens = self.prepare(&rec, job_system, capacity);
                        (rec, tokens)
                    });
                    let fatal = item.is_err();
                    if tx.send(item).is_err() || fatal {
                        break;
                    }
                }
            });
            self.step_loop(&rx, sink)
        })
    }

    /// Runs records whose prompts are already token ids (benchmarks).
    pub fn run_tokens(
        &self,
        items: Vec<(InputRecord, Vec<u32>)>,
        sink: &mut ParquetSink,
    ) -> Result<JobSummary> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prepared>>(items.len().max(1));
        for (rec, ids) in items {
            tx.send(Ok((rec, Ok(ids))))
                .expect("the receiver lives until the loop ends");
        }
        drop(tx);
        self.step_loop(&rx, sink)
    }

    /// (prompt length, prompt + continuation tokens) of a record: the
    /// continuation's tokens are those that encoding prompt + continuation
    /// adds after the prompt's own encoding.
    fn continuation_tokens(
        &self,
        rec: &InputRecord,
        job_system: &str,
    ) -> std::result::Result<(usize, Vec<u32>), String> {
        let body = rec.body.as_ref().map_err(|e| e.clone())?;
        let cont = body.continuation.as_deref().ok_or_else(|| {
            format!(
                "record {}: the continuation is missing or null, expected a string (scoring.mode = loglikelihood)",
                rec.id
            )
        })?;
        if cont.is_empty() {
            return Err(format!("record {}: the continuation is empty", rec.id));
        }
        let prompt = self.tokenize(rec, job_system)?;
        let text = self.render(rec, job_system)?;
        let all = self
            .prompter
            .encode(&format!("{text}{cont}"))
            .map_err(|e| format!("record {}: {e}", rec.id))?;
        if all.len() <= prompt.len() || all[..prompt.len()] != prompt[..] {
            return Err(format!(
                "record {}: the continuation does not tokenize as an extension of the prompt",
                rec.id
            ));
        }
        Ok((prompt.len(), all))
    }

    /// Tokenizes a record and checks that it fits the KV cache.
    fn prepare(
        &self,
        rec: &InputRecord,
        job_system: &str,
        capacity: usize,
    ) -> std::result::Result<Vec<u32>, String> {
        let ctx = self.model.config().max_position_embeddings;
        let t = self.tokenize(rec, job_system)?;
        let params = &rec
            .body
            .as_ref()
            .expect("tokenized records have a body")
            .params;
        let need = t.len() + params.max_new_tokens.min(ctx - t.len());
        if need > capacity {
            return Err(format!(
                "record {}: prompt ({}) + max_new_tokens needs {need} cache tokens, the KV cache holds {capacity} (engine.num_blocks x engine.block_size)",
                rec.id,
                t.len()
            ));
        }
        Ok(t)
    }

    fn step_loop(
        &self,
        rx: &std::sync::mpsc::Receiver<Result<Prepared>>,
        sink: &mut ParquetSink,
    ) -> Result<JobSummary> {
        let start = Instant::now();
        let mut sum = JobSummary::default();
        let mut sched = Scheduler::new(self.sched);
        let mut cache = self
            .model
            .new_cache(self.sched.num_blocks, self.sched.block_size)?;
        let mut seqs: HashMap<SeqId, Seq> = HashMap::new();
        let mut next_id = 0u64;
        let mut exhausted = false;
        let lookahead = 4 * self.sched.max_num_seqs;
        let ctx = self.model.config().max_position_embeddings;
        loop {
            if self.stop_requested() {
                sum.interrupted = true;
                break;
            }
            // Read ahead and tokenize; a window sorted by prompt tokens puts
            // records sharing a prefix next to each other.
            if !exhausted && sched.waiting() < self.sched.max_num_seqs {
                let mut fresh: Vec<(Vec<u32>, Seq)> = Vec::new();
                while fresh.len() < lookahead {
                    let next = if fresh.is_empty() && sched.is_empty() {
                        rx.recv().ok()
                    } else {
                        match rx.try_recv() {
                            Ok(x) => Some(x),
                            Err(std::sync::mpsc::TryRecvError::Empty) => break,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                        }
                    };
                    let Some(item) = next else {
                        exhausted = true;
                        break;
                    };
                    let (rec, tokens) = item?;
                    let read_ms = ms(start, Instant::now());
                    match tokens {
                        Err(msg) => {
                            tracing::warn!(record = %rec.id, "{msg}");
                            sum.errors += 1;
                            sum.records += 1;
                            sink.push(error_row(&rec, msg, read_ms, &self.defaults))?;
                        }
                        Ok(prompt) => {
                            let params = rec
                                .body
                                .as_ref()
                                .map_or_else(|_| self.defaults.clone(), |b| b.params.clone());
                            fresh.push((
                                prompt.clone(),
                                Seq {
                                    rng: RecordRng::new(params.seed, &rec.id),
                                    reference: rec
                                        .body
                                        .as_ref()
                                        .ok()
                                        .and_then(|b| b.reference.clone()),
                                    rec_id: rec.id,
                                    row: rec.row,
                                    params,
                                    prompt_len: prompt.len(),
                                    admitted: None,
                                    queue_ms: 0.0,
                                    first_token: None,
                                },
                            ));
                        }
                    }
                }
                fresh.sort_by(|a, b| a.0.cmp(&b.0));
                for (prompt, seq) in fresh {
                    let id = SeqId(next_id);
                    next_id += 1;
                    sched.add(id, prompt);
                    seqs.insert(id, seq);
                }
            }
            if sched.is_empty() {
                break;
            }
            let plan = sched.schedule();
            for c in &plan.copies {
                cache.copy_block(c.from, c.to)?;
            }
            let now = Instant::now();
            for c in &plan.chunks {
                let s = seqs.get_mut(&c.seq).expect("scheduled sequence");
                if s.admitted.is_none() {
                    s.admitted = Some(now);
                    s.queue_ms = ms(start, now);
                }
            }
            let chunks: Vec<SeqChunk<'_>> = plan
                .chunks
                .iter()
                .map(|c| SeqChunk {
                    tokens: &sched.tokens(c.seq)[c.start..c.start + c.len],
                    start_pos: c.start,
                    blocks: sched.block_table(c.seq),
                })
                .collect();
            let logits = self.model.forward(&chunks, &mut cache, false)?;
            drop(chunks);
            sched.commit(&plan);
            sum.steps += 1;
            sum.forward_tokens += plan.chunks.iter().map(|c| c.len).sum::<usize>();
            #[cfg(feature = "cuda")]
            if self.model.device().is_cuda() {
                if let Ok((free, total)) = crate::cuda::mem_info() {
                    sum.peak_device_bytes = sum.peak_device_bytes.max(total - free);
                }
            }
            let (used, free) = sched.blocks();
            let stats = sched.stats();
            tracing::debug!(
                step = sum.steps,
                seqs = plan.chunks.len(),
                prefill_tokens = plan
                    .chunks
                    .iter()
                    .filter(|c| c.len > 1 || !c.samples)
                    .map(|c| c.len)
                    .sum::<usize>(),
                decode_tokens = plan
                    .chunks
                    .iter()
                    .filter(|c| c.len == 1 && c.samples)
                    .count(),
                blocks_used = used,
                blocks_free = free,
                cache_hit_tokens = stats.kv.hit_tokens,
                preemptions = stats.preemptions,
                "step"
            );
            let mut picked = self.pick_tokens(&logits, &plan.chunks, &seqs)?;
            let now = Instant::now();
            for (i, c) in plan.chunks.iter().enumerate() {
                if !c.samples {
                    continue; // mid-prefill chunk: no token yet
                }
                let s = seqs.get_mut(&c.seq).expect("scheduled sequence");
                let tok = match picked[i].take() {
                    Some(Picked::Token(t)) => t,
                    Some(Picked::Logits(mut row)) => {
                        sampler::sample(&mut row, sched.tokens(c.seq), &s.params, &mut s.rng)
                    }
                    Some(Picked::Candidates(cand)) => {
                        sampler::sample_sorted(&cand, &s.params, &mut s.rng)
                    }
                    None => unreachable!("every sampling chunk has a pick"),
                };
                sched.push_token(c.seq, tok);
                s.first_token.get_or_insert(now);
                let generated = &sched.tokens(c.seq)[s.prompt_len..];
                if let Some(reason) = self.finish_reason(s, generated, tok, ctx)? {
                    let s = seqs.remove(&c.seq).expect("scheduled sequence");
                    let row = self.ok_row(s, &sched, c.seq, reason, now)?;
                    sched.finish(c.seq);
                    sum.records += 1;
                    sum.ok += 1;
                    sum.prompt_tokens += row.prompt_tokens as usize;
                    sum.completion_tokens += row.completion_tokens as usize;
                    sum.cached_prompt_tokens += row.cached_prompt_tokens as usize;
                    sink.push(row)?;
                }
            }
        }
        sink.flush()?;
        let stats = sched.stats();
        sum.prefix_hit_tokens = stats.kv.hit_tokens as usize;
        sum.preemptions = stats.preemptions as usize;
        sum.wall_s = start.elapsed().as_secs_f64();
        Ok(sum)
    }

    /// Per chunk: the greedy token picked on the device (CUDA, greedy, no
    /// repetition penalty: only token ids cross PCIe) or the logits row for
    /// the host sampler.
    fn pick_tokens(
        &self,
        logits: &candle_core::Tensor,
        chunks: &[crate::scheduler::Chunk],
        seqs: &HashMap<SeqId, Seq>,
    ) -> Result<Vec<Option<Picked>>> {
        #[derive(PartialEq)]
        enum Where {
            Skip,
            DeviceArgmax,
            DeviceTopK,
            Host,
        }
        let cuda = logits.device().is_cuda();
        let route: Vec<Where> = chunks
            .iter()
            .map(|c| {
                let p = &seqs[&c.seq].params;
                if !c.samples {
                    Where::Skip
                } else if !cuda || p.repetition_penalty != 1.0 {
                    Where::Host
                } else if p.temperature == 0.0 {
                    Where::DeviceArgmax
                } else if cfg!(feature = "cuda") && p.top_k >= 1 && p.top_k <= TOPK_MAX {
                    Where::DeviceTopK
                } else {
                    Where::Host
                }
            })
            .collect();
        let mut out: Vec<Option<Picked>> = (0..chunks.len()).map(|_| None).collect();
        if route.contains(&Where::DeviceArgmax) {
            let ids = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
            for (i, r) in route.iter().enumerate() {
                if *r == Where::DeviceArgmax {
                    out[i] = Some(Picked::Token(ids[i]));
                }
            }
        }
        let rows_of = |w: Where| -> Vec<u32> {
            route
                .iter()
                .enumerate()
                .filter(|(_, r)| **r == w)
                .map(|(i, _)| i as u32)
                .collect()
        };
        #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
        let mut host = rows_of(Where::Host);
        #[cfg(feature = "cuda")]
        {
            let topk = rows_of(Where::DeviceTopK);
            if !topk.is_empty() {
                // Only each row's top-k candidates cross PCIe; the host draws
                // from them exactly as from its own sorted, truncated list.
                let n = topk.len();
                let idx = candle_core::Tensor::from_vec(topk.clone(), n, logits.device())?;
                let params: Vec<&GenerationParams> = topk
                    .iter()
                    .map(|&i| &seqs[&chunks[i as usize].seq].params)
                    .collect();
                let k = params.iter().map(|p| p.top_k).max().unwrap_or(1);
                let temps: Vec<f32> = params.iter().map(|p| p.temperature as f32).collect();
                let cands = crate::cuda::topk_rows(&logits.index_select(&idx, 0)?, &temps, k)?;
                for ((i, mut c), p) in topk.into_iter().zip(cands).zip(params) {
                    c.truncate(p.top_k);
                    if c.is_empty() {
                        host.push(i); // no finite logit: the host sampler's fallback
                    } else {
                        out[i as usize] = Some(Picked::Candidates(c));
                    }
                }
            }
        }
        if !host.is_empty() {
            let n = host.len();
            let idx = candle_core::Tensor::from_vec(host.clone(), n, logits.device())?;
            let rows = logits.index_select(&idx, 0)?.to_vec2::<f32>()?;
            for (i, row) in host.into_iter().zip(rows) {
                out[i as usize] = Some(Picked::Logits(row));
            }
        }
        Ok(out)
    }

    fn finish_reason(
        &self,
        s: &Seq,
        generated: &[u32],
        tok: u32,
        ctx: usize,
    ) -> Result<Option<FinishReason>> {
        if !s.params.ignore_eos && self.prompter.stop_ids().contains(&tok) {
            return Ok(Some(FinishReason::Stop));
        }
        if !s.params.stop.is_empty() {
            // Checked every step, so a stop string can only end in the newest
            // token: decoding a tail window that covers the longest stop string
            // (a character takes at most 4 byte-fallback tokens) plus margin
            // for the decoder's handling of the window's first token is enough.
            let longest = s
                .params
                .stop
                .iter()
                .map(|st| st.chars().count())
                .max()
                .unwrap_or(0);
            let window = 4 * longest + 4;
            let text = self
                .prompter
                .decode(&generated[generated.len().saturating_sub(window)..])?;
            if s.params.stop.iter().any(|st| text.contains(st.as_str())) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if generated.len() >= s.params.max_new_tokens || s.prompt_len + generated.len() >= ctx {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    fn ok_row(
        &self,
        s: Seq,
        sched: &Scheduler,
        id: SeqId,
        reason: FinishReason,
        now: Instant,
    ) -> Result<OutputRow> {
        let generated = &sched.tokens(id)[s.prompt_len..];
        let mut text = self.prompter.decode(generated)?;
        if let Some(cut) = s
            .params
            .stop
            .iter()
            .filter_map(|st| text.find(st.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        let admitted = s.admitted.unwrap_or(now);
        let scores = self.scorer.score(&text, s.reference.as_deref());
        Ok(OutputRow {
            reference: s.reference.clone(),
            scores: scores.values.iter().map(|v| v.1).collect(),
            extracted: scores.extracted,
            loglikelihood: None,
            id: s.rec_id,
            input_row: s.row,
            completion: Some(text),
            finish_reason: reason.as_str(),
            status: "ok",
            error: None,
            prompt_tokens: s.prompt_len as u32,
            completion_tokens: generated.len() as u32,
            cached_prompt_tokens: sched.cached_prompt_tokens(id) as u32,
            max_new_tokens: s.params.max_new_tokens as u32,
            temperature: s.params.temperature,
            top_p: s.params.top_p,
            top_k: s.params.top_k as u32,
            repetition_penalty: s.params.repetition_penalty,
            seed: s.params.seed,
            queue_ms: s.queue_ms,
            ttft_ms: s.first_token.map(|t| ms(admitted, t)),
            total_ms: ms(admitted, now),
            completion_token_ids: if self.include_token_ids {
                generated.to_vec()
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
        reference: rec.body.as_ref().ok().and_then(|b| b.reference.clone()),
        scores: Vec::new(),
        extracted: None,
        loglikelihood: None,
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
