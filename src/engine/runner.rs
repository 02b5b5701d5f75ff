//! The model runner: turns a scheduled step into one forward and hands back
//! the logits rows the step's requests asked for. It owns the device-side
//! state of a batch (the paged KV cache; CUDA graphs will live here).

use crate::backend::timeline::{Breakdown, GapMeter, Timeline};
use crate::backend::Ops;
use crate::model::{DecodeGraphs, IdPatch, LogitRows, Mistral, PagedKvCache, SeqChunk};
use crate::scheduler::{Scheduler, StepPlan};
use crate::Result;
use candle_core::Tensor;
use std::time::Instant;

/// The logits of one step.
#[derive(Debug)]
pub struct StepLogits {
    /// f32 `[rows, vocab]`, on the runner's device.
    pub logits: Tensor,
    /// The ops of that device (where sampling candidates are picked).
    pub ops: &'static dyn Ops,
    /// Per chunk of the plan: its first row in `logits` and its row count
    /// (the sampled row of a generation chunk, the scored rows of a scoring
    /// chunk, none for a mid-prefill chunk).
    pub spans: Vec<(usize, usize)>,
}

/// Runs the model over a step.
pub trait ModelRunner {
    /// Does the plan's block copies, runs its chunks through the model and
    /// returns the logits of the rows that `logit_rows` names.
    fn execute(&mut self, plan: &StepPlan, sched: &Scheduler) -> Result<StepLogits> {
        self.execute_patched(plan, sched, None)
    }

    /// [`Self::execute`], with the token ids of `patch`'s rows (flattened
    /// over the plan's chunks) taken from the device instead of the
    /// scheduler's placeholders.
    fn execute_patched(
        &mut self,
        plan: &StepPlan,
        sched: &Scheduler,
        patch: Option<&IdPatch>,
    ) -> Result<StepLogits>;

    /// The most device memory this process's tensors took since the cache
    /// was sized (`None` where not measured: the CPU).
    fn peak_device_bytes(&self) -> Option<usize> {
        None
    }

    /// Device time per kernel class of the steps run, when asked for.
    fn breakdown(&self) -> Option<Breakdown> {
        None
    }

    /// The host's wall time per phase of the step just executed, added to
    /// the breakdown when one is kept.
    fn note_host(&mut self, _phases: &[(&'static str, f64)]) {}
}

/// The rows of a step's flattened batch that need logits, and each chunk's
/// span of them.
pub fn logit_rows(plan: &StepPlan, sched: &Scheduler) -> (Vec<u32>, Vec<(usize, usize)>) {
    let mut rows = Vec::new();
    let mut spans = Vec::with_capacity(plan.chunks.len());
    let mut offset = 0;
    for c in &plan.chunks {
        let (from, to) = sched.request(c.seq).logit_rows(c.start, c.len);
        spans.push((rows.len(), to - from));
        rows.extend((from..to).map(|r| (offset + r) as u32));
        offset += c.len;
    }
    (rows, spans)
}

/// The Mistral model over its paged cache.
pub struct MistralRunner<'m> {
    model: &'m Mistral,
    cache: PagedKvCache,
    /// Kernel-class times of every step, when measured.
    breakdown: Option<Breakdown>,
    /// When the last timed step started, and its kind.
    last_step: Option<(Instant, &'static str)>,
    /// The device's idle time between forwards (`RUNNER_GPU_GAPS=1`).
    gaps: Option<GapMeter>,
    /// Decode steps through CUDA graphs (`engine.cuda_graphs`, CUDA only).
    graphs: Option<DecodeGraphs>,
}

impl<'m> MistralRunner<'m> {
    /// A runner with an empty cache of `num_blocks` blocks.
    pub fn new(model: &'m Mistral, num_blocks: usize, block_size: usize) -> Result<Self> {
        Ok(Self {
            cache: model.new_cache(num_blocks, block_size)?,
            model,
            breakdown: None,
            last_step: None,
            gaps: GapMeter::from_env(model.device()),
            graphs: None,
        })
    }

    /// Replays decode steps from CUDA graphs (`engine.cuda_graphs`; a
    /// CUDA device only, and never while the breakdown times each kernel
    /// class).
    pub fn with_graphs(mut self, on: bool) -> Self {
        let cuda = matches!(self.model.device(), candle_core::Device::Cuda(_));
        self.graphs = (on && cuda).then(DecodeGraphs::new);
        self
    }

    /// Times every step's kernel classes (`runner bench --breakdown`).
    pub fn with_breakdown(mut self, on: bool) -> Self {
        self.breakdown = on.then(Breakdown::default);
        self
    }
}

impl ModelRunner for MistralRunner<'_> {
    fn execute_patched(
        &mut self,
        plan: &StepPlan,
        sched: &Scheduler,
        patch: Option<&IdPatch>,
    ) -> Result<StepLogits> {
        let lens: Vec<usize> = plan.chunks.iter().map(|c| c.len).collect();
        if let Some(b) = &mut self.breakdown {
            let now = Instant::now();
            if let Some((t0, kind)) = self.last_step.take() {
                b.add_period(kind, (now - t0).as_secs_f64() * 1e3);
            }
            self.last_step = Some((now, Breakdown::kind(&lens)));
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
        let (rows, spans) = logit_rows(plan, sched);
        // A step of mid-prefill chunks only still takes one row through the
        // LM head (no zero-row products); no span points at it.
        let pick: &[u32] = if rows.is_empty() { &[0] } else { &rows };
        let rows = LogitRows::These(pick);
        if let Some(g) = &mut self.gaps {
            if g.probe_now() && plan.copies.is_empty() {
                let (eager, graph) =
                    self.model
                        .probe_graph(&chunks, &mut self.cache, rows, patch)?;
                tracing::info!(tokens = lens.len(), eager_ms = eager, graph_ms = ?graph, "graph probe");
            }
            g.begin()?;
        }
        self.cache.copy_blocks(&plan.copies)?;
        let mut t = match self.breakdown {
            Some(_) => Timeline::on(self.model.device())?,
            None => Timeline::off(),
        };
        let logits = match (&mut self.graphs, &self.breakdown) {
            (Some(g), None) => {
                self.model
                    .forward_graphed(g, &chunks, &mut self.cache, rows, patch)?
            }
            _ => self
                .model
                .forward_timed(&chunks, &mut self.cache, rows, patch, &mut t)?,
        };
        if let Some(b) = &mut self.breakdown {
            b.add(&lens, t.finish()?);
        }
        if let Some(g) = &mut self.gaps {
            g.end()?;
        }
        Ok(StepLogits {
            logits,
            spans,
            ops: self.model.ops(),
        })
    }

    fn peak_device_bytes(&self) -> Option<usize> {
        self.model.ops().peak_memory(self.model.device())
    }

    fn breakdown(&self) -> Option<Breakdown> {
        self.breakdown.clone()
    }

    fn note_host(&mut self, phases: &[(&'static str, f64)]) {
        if let (Some(b), Some((_, kind))) = (&mut self.breakdown, self.last_step) {
            b.add_host(kind, phases);
        }
    }
}

impl Drop for MistralRunner<'_> {
    fn drop(&mut self) {
        if let Some(g) = &self.graphs {
            tracing::info!(
                captures = g.captures,
                replays = g.replays,
                "decode steps replayed from cuda graphs"
            );
        }
        if let Some(g) = &self.gaps {
            match g.totals() {
                Ok((steps, busy_ms, gap_ms)) => {
                    tracing::info!(
                        steps,
                        busy_ms,
                        gap_ms,
                        "device time of the forwards and between them"
                    )
                }
                Err(e) => tracing::warn!("the gap meter failed: {e}"),
            }
        }
    }
}

/// The test-only device fault: with `RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS=N`
/// in the environment, step N + 1 fails as a device fault would (exit code
/// 4), so that the tests can check what a GPU failure leaves behind;
/// `N@K` arms it on the K-th engine of `engine.devices` only, and a
/// `:panic` suffix makes the step panic instead (as a binding might).
pub struct FaultAfter<R> {
    inner: R,
    left: Option<usize>,
    panic: bool,
}

/// The variable that arms [`FaultAfter`].
pub const FAULT_ENV: &str = "RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS";

impl<R: ModelRunner> FaultAfter<R> {
    /// `inner`, failing after the steps the environment names (never when
    /// unset, or when it names another engine than `worker`).
    pub fn from_env(inner: R, worker: usize) -> Self {
        let var = std::env::var(FAULT_ENV).ok();
        let panic = var.as_deref().is_some_and(|v| v.ends_with(":panic"));
        let var = var.map(|v| v.trim_end_matches(":panic").to_string());
        let left = var.and_then(|v| {
            let (n, at) = match v.split_once('@') {
                Some((n, k)) => (n, Some(k.parse::<usize>().ok()?)),
                None => (v.as_str(), None),
            };
            at.is_none_or(|k| k == worker)
                .then(|| n.parse().ok())
                .flatten()
        });
        Self { inner, left, panic }
    }
}

impl<R: ModelRunner> ModelRunner for FaultAfter<R> {
    fn execute_patched(
        &mut self,
        plan: &StepPlan,
        sched: &Scheduler,
        patch: Option<&IdPatch>,
    ) -> Result<StepLogits> {
        match &mut self.left {
            Some(0) if self.panic => panic!("injected device panic ({FAULT_ENV})"),
            Some(0) => Err(crate::Error::Device(format!(
                "injected device fault ({FAULT_ENV})"
            ))),
            Some(n) => {
                *n -= 1;
                self.inner.execute_patched(plan, sched, patch)
            }
            None => self.inner.execute_patched(plan, sched, patch),
        }
    }

    fn peak_device_bytes(&self) -> Option<usize> {
        self.inner.peak_device_bytes()
    }

    fn breakdown(&self) -> Option<Breakdown> {
        self.inner.breakdown()
    }

    fn note_host(&mut self, phases: &[(&'static str, f64)]) {
        self.inner.note_host(phases);
    }
}
