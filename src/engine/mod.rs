//! The engine: a loaded model and prompter that run a job's records.
//!
//! A run is a reader thread (records to token ids, `tokenize`) feeding the
//! step pipeline: `intake` queues requests in the scheduler, and each step
//! (`step`) is schedule -> `runner::ModelRunner::execute` -> `pick` (the
//! sampler's choice, on the device where the settings allow) -> `update`
//! (tokens, scores, stop checks) -> `rows` -> the sink. Generation and
//! loglikelihood scoring are two kinds of one request.

mod fleet;
mod intake;
mod logprobs;
mod overlap;
mod pick;
mod rows;
pub mod runner;
mod step;
#[cfg(test)]
mod tests;
mod tokenize;
mod update;

pub use crate::backend::device::{candle_device, visible_gpus, CPU_CACHE_FRACTION};
pub use fleet::{Fleet, FleetSummary, SharedInput};
pub use rows::error_row;
pub use step::Pipeline;
pub use tokenize::{Prepared, Tokenized};

use crate::config::{GenerationParams, JobSpec};
use crate::input::InputRecord;
use crate::model::{HubSettings, LoadOptions, Mistral, QuantConfig};
use crate::output::{JobMeta, RowSink};
use crate::prompt::Prompter;
use crate::scheduler::SchedulerConfig;
use crate::Result;
use intake::Intake;
use runner::{MistralRunner, ModelRunner};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Figures of a finished run (written into `_metrics.json` as `last_run`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
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
    /// Most device memory this process's tensors took during the run
    /// (CUDA's memory pool; `None` on the CPU, blank in the report).
    pub peak_device_bytes: Option<usize>,
    /// Tokens run through the model (prefill chunks, recomputes, decodes).
    pub forward_tokens: usize,
    /// Of those, prompt positions (a record's samples share one prefill).
    pub prefill_tokens: usize,
    /// The run stopped early on request (a signal); in-flight records were
    /// dropped unwritten and run again on resume.
    pub interrupted: bool,
    /// Device time per kernel class and step kind (`runner bench
    /// --breakdown` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breakdown: Option<crate::backend::timeline::Breakdown>,
}

/// A model with its prompter, ready to run records.
pub struct Engine {
    model: Mistral,
    prompter: Prompter,
    max_prompt_tokens: usize,
    sched: SchedulerConfig,
    include_token_ids: bool,
    include_stop_str: bool,
    defaults: GenerationParams,
    stop: Option<Arc<AtomicBool>>,
    scorer: crate::scoring::Scorer,
    loglikelihood: bool,
    logprobs: usize,
    prompt_logprobs: bool,
    /// Matchers for constrained records, built on first use.
    guides: crate::guide::LazyGuides,
    /// Its place among a fleet's engines (the test-only fault names it).
    worker: usize,
    /// In a fleet of several: the records it reads ahead and keeps waiting
    /// (`None`: 4 x `max_num_seqs` read ahead, the most on its own).
    window: Option<usize>,
    /// Time every step's kernel classes (`runner bench --breakdown`).
    breakdown: bool,
    /// `engine.overlap`.
    overlap: bool,
    /// `engine.cuda_graphs`.
    cuda_graphs: bool,
}

impl Engine {
    /// Loads the model and tokenizer named by the job. With
    /// `load_format = "dummy"` the weights are random (config, tokenizer and,
    /// unless `model.dummy_quant` says otherwise, quantization still come
    /// from the model directory).
    pub fn load(spec: &JobSpec, hub: &HubSettings) -> Result<(Self, JobMeta)> {
        let dir = crate::model::resolve_model_dir(&spec.model, hub)?;
        let device = candle_device(spec.engine.device, spec.model.dtype)?;
        let opts = LoadOptions {
            dtype: spec.model.dtype.candle(),
            device,
            gptq_mode: spec.engine.gptq_kernel,
            kv_fp8: spec.engine.kv_cache_dtype == crate::config::KvCacheDtype::Fp8,
            prefill_attention: spec.engine.prefill_attention,
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
        let num_blocks = crate::backend::device::cache_blocks(&model, spec)?;
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
            passthrough: None,
            // OpenAI Batch requests ask for log-probabilities one by one.
            logprobs: match spec.input.format {
                crate::config::InputFormat::OpenaiBatch => spec.output.logprobs.max(1),
                _ => spec.output.logprobs,
            },
            prompt_logprobs: spec.output.prompt_logprobs,
            constrained: spec.generation.constraint.is_some()
                || spec.input.format == crate::config::InputFormat::OpenaiBatch,
        };
        let guides = crate::guide::LazyGuides::new(
            prompter.tokenizer_file(),
            model.config().vocab_size,
            prompter.stop_ids(),
        );
        let engine = Self {
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
            include_stop_str: spec.output.include_stop_str,
            defaults: spec.generation.clone(),
            stop: None,
            scorer: crate::scoring::Scorer::new(&spec.scoring),
            loglikelihood: spec.scoring.loglikelihood,
            logprobs: spec.output.logprobs,
            prompt_logprobs: spec.output.prompt_logprobs,
            guides,
            worker: 0,
            window: None,
            breakdown: false,
            overlap: spec.engine.overlap,
            cuda_graphs: spec.engine.cuda_graphs,
        };
        crate::backend::cuda::set_cublas_tuning(spec.engine.cublas_tuning);
        // A job-wide constraint that does not compile fails before any record.
        if let Some(c) = &spec.generation.constraint {
            engine
                .guides
                .guide(c)
                .map_err(|e| crate::Error::Config(format!("generation.{} {e}", c.key())))?;
        }
        Ok((engine, meta))
    }

    /// Stops the run (after the current step, finished records flushed)
    /// once `flag` is set.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// Times every step's kernel classes into the run's summary
    /// (`JobSummary::breakdown`): a measurement mode, one device sync per
    /// step more.
    pub fn set_breakdown(&mut self, on: bool) {
        self.breakdown = on;
    }

    /// The model.
    pub fn model(&self) -> &Mistral {
        &self.model
    }

    /// Runs every record of `input` and writes one row per record to `sink`.
    pub fn run(
        &self,
        input: &mut (dyn Iterator<Item = Result<InputRecord>> + Send),
        job_system: &str,
        sink: &mut dyn RowSink,
    ) -> Result<JobSummary> {
        let tok = tokenize::Tokenizer {
            prompter: &self.prompter,
            job_system,
            max_prompt_tokens: self.max_prompt_tokens,
            ctx: self.model.config().max_position_embeddings,
            capacity: self.sched.num_blocks * self.sched.block_size,
            score: self.loglikelihood,
        };
        // Reading and tokenizing upcoming records overlaps with model work.
        std::thread::scope(|scope| {
            let depth = self.window.unwrap_or(4 * self.sched.max_num_seqs);
            let (tx, rx) = sync_channel::<Result<Prepared>>(depth);
            let tok = &tok;
            scope.spawn(move || {
                for rec in input {
                    let item = rec.map(|rec| {
                        let t = tok.prepare(&rec);
                        (rec, t)
                    });
                    let fatal = item.is_err();
                    if tx.send(item).is_err() || fatal {
                        break;
                    }
                }
            });
            self.run_prepared(&rx, sink)
        })
    }

    /// Runs records whose prompts are already token ids (benchmarks).
    pub fn run_tokens(
        &self,
        items: Vec<(InputRecord, Vec<u32>)>,
        sink: &mut dyn RowSink,
    ) -> Result<JobSummary> {
        let (tx, rx) = sync_channel::<Result<Prepared>>(items.len().max(1));
        for (rec, tokens) in items {
            let t = Tokenized {
                prompt_len: tokens.len(),
                tokens,
            };
            tx.send(Ok((rec, Ok(t))))
                .expect("the receiver lives until the loop ends");
        }
        drop(tx);
        self.run_prepared(&rx, sink)
    }

    /// The step loop over prepared records.
    fn run_prepared(
        &self,
        rx: &Receiver<Result<Prepared>>,
        sink: &mut dyn RowSink,
    ) -> Result<JobSummary> {
        let mistral =
            MistralRunner::new(&self.model, self.sched.num_blocks, self.sched.block_size)?
                .with_breakdown(self.breakdown)
                .with_graphs(self.cuda_graphs);
        let mut runner = runner::FaultAfter::from_env(mistral, self.worker);
        let mut pipe = self.pipeline();
        pipe.logprobs = self.logprobs;
        pipe.vocab = self.model.config().vocab_size;
        pipe.overlap = self.overlap;
        let mut intake = Intake::new(
            rx,
            &self.defaults,
            self.sched.max_num_seqs,
            self.loglikelihood,
        );
        if let Some(w) = self.window {
            intake = intake.with_window(w);
        }
        intake.prompt_logprobs = self.prompt_logprobs;
        intake.guides = Some(&self.guides);
        let stop = || {
            self.stop
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Relaxed))
        };
        drive(&mut pipe, &mut intake, &mut runner, sink, &stop)?;
        Ok(pipe.finish(&runner))
    }

    fn pipeline(&self) -> Pipeline<'_> {
        Pipeline::new(
            self.sched,
            update::StopRule {
                decoder: &self.prompter,
                ctx: self.model.config().max_position_embeddings,
            },
            rows::RowBuilder {
                decoder: &self.prompter,
                scorer: &self.scorer,
                include_token_ids: self.include_token_ids,
                include_stop_str: self.include_stop_str,
            },
        )
    }
}

/// The devices of a job's engines: `engine.devices` (`"all"`: every
/// visible GPU, else `engine.device` alone), else `engine.device`.
pub fn job_devices(e: &crate::config::EngineSpec) -> Result<Vec<crate::config::Device>> {
    if e.all_devices {
        // Logged, not silent: a build without CUDA or a machine without a
        // GPU runs one engine where `engine.device` says.
        match visible_gpus() {
            Ok(gpus) if !gpus.is_empty() => return Ok(gpus),
            Ok(_) => {
                tracing::warn!(device = %e.device, "engine.devices = \"all\" but no GPU is visible: one engine on engine.device")
            }
            Err(err) => {
                tracing::warn!(device = %e.device, "engine.devices = \"all\" but no GPU can be used ({err}): one engine on engine.device")
            }
        }
        return Ok(vec![e.device]);
    }
    Ok(match e.devices.is_empty() {
        true => vec![e.device],
        false => e.devices.clone(),
    })
}

/// Steps until the input is exhausted and nothing is in flight, or `stop`
/// says so (in-flight records are then dropped unwritten: a resume runs
/// them again); flushes the sink.
fn drive(
    pipe: &mut Pipeline<'_>,
    intake: &mut Intake<'_>,
    runner: &mut dyn ModelRunner,
    sink: &mut dyn RowSink,
    stop: &dyn Fn() -> bool,
) -> Result<()> {
    loop {
        if stop() {
            pipe.sum.interrupted = true;
            break;
        }
        intake.fill(pipe, sink)?;
        if pipe.sched.is_empty() {
            break;
        }
        pipe.step(runner, sink)?;
        sink.tick()?;
    }
    // An overlapped step still in flight: its finished rows too.
    pipe.settle(sink)?;
    sink.flush()
}
