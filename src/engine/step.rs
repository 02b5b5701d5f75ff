//! One engine step as a pipeline: schedule -> `ModelRunner::execute` ->
//! sampler picks -> scheduler update -> finished requests -> rows -> sink.

use super::logprobs;
use super::overlap::Inflight;
use super::pick::{self, Picked};
use super::rows::{ms, RowBuilder};
use super::runner::{ModelRunner, StepLogits};
use super::update::{self, StopRule};
use super::JobSummary;
use crate::output::RowSink;
use crate::scheduler::{Chunk, Request, Scheduler, SchedulerConfig, SeqId, StepPlan};
use crate::Result;
use std::time::Instant;

/// The state one run's steps share.
pub struct Pipeline<'a> {
    /// Owns every request in flight.
    pub sched: Scheduler,
    /// When a generation is done.
    pub stops: StopRule<'a>,
    /// Finished requests to rows.
    pub rows: RowBuilder<'a>,
    /// The run's counters.
    pub sum: JobSummary,
    /// `output.logprobs`: k (0 = none recorded).
    pub logprobs: usize,
    /// The logits row length (constraint masks cover it).
    pub vocab: usize,
    /// `engine.overlap`: queue the next greedy step before this one's
    /// tokens reach the host (`overlap`).
    pub overlap: bool,
    /// The overlapped step queued on the device, its ids on their way.
    pub(super) inflight: Option<Inflight>,
    start: Instant,
    next_id: u64,
}

impl<'a> Pipeline<'a> {
    /// An empty pipeline.
    pub fn new(cfg: SchedulerConfig, stops: StopRule<'a>, rows: RowBuilder<'a>) -> Self {
        Self {
            sched: Scheduler::new(cfg),
            stops,
            rows,
            sum: JobSummary::default(),
            logprobs: 0,
            vocab: 0,
            overlap: false,
            inflight: None,
            start: Instant::now(),
            next_id: 0,
        }
    }

    /// Milliseconds since the run started.
    pub fn elapsed_ms(&self) -> f64 {
        ms(self.start, Instant::now())
    }

    /// Queues a request.
    pub fn add(&mut self, req: Request) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.sched.add(id, req);
        id
    }

    /// Runs one step; writes the rows of the requests it finished.
    pub fn step(&mut self, runner: &mut dyn ModelRunner, sink: &mut dyn RowSink) -> Result<()> {
        if self.overlap {
            return self.step_overlapped(runner, sink);
        }
        let mut clock = PhaseClock::start();
        let plan = self.schedule_step();
        clock.lap("schedule");
        self.run_in_order(plan, runner, sink, clock)
    }

    /// The next step's plan.
    pub(super) fn schedule_step(&mut self) -> StepPlan {
        let plan = self.sched.schedule();
        self.mark_admitted(&plan);
        plan
    }

    /// Runs a planned step to its end: forward, picks, tokens, rows.
    pub(super) fn run_in_order(
        &mut self,
        mut plan: StepPlan,
        runner: &mut dyn ModelRunner,
        sink: &mut dyn RowSink,
        mut clock: PhaseClock,
    ) -> Result<()> {
        let mut out = runner.execute(&plan, &self.sched)?;
        clock.skip();
        // The forward runs on the device while the host computes the
        // constrained requests' masks.
        self.compute_masks(&plan);
        self.sched.commit(&plan);
        self.count(&plan);
        clock.lap("commit");
        let mut picks = pick::pick(&out, &plan, &self.sched, &self.stops)?;
        clock.lap("pick");
        update::record_known(&mut self.sched, &plan, &out)?;
        self.fork_samples(&mut plan, &mut out, &mut picks);
        let finished = update::apply(&mut self.sched, &plan, picks, &self.stops)?;
        logprobs::record_sampled(&mut self.sched, &plan, &out, self.logprobs)?;
        clock.lap("update");
        self.write_rows(finished, sink)?;
        clock.lap("rows");
        runner.note_host(&clock.phases);
        Ok(())
    }

    /// The rows of the requests this step finished, to the sink.
    pub(super) fn write_rows(
        &mut self,
        finished: Vec<(SeqId, crate::output::FinishReason)>,
        sink: &mut dyn RowSink,
    ) -> Result<()> {
        for (id, reason) in finished {
            let req = self.sched.finish(id).expect("a finished request is known");
            let row = self.rows.finished(req, reason)?;
            self.sum.records += 1;
            self.sum.ok += 1;
            self.sum.prompt_tokens += row.prompt_tokens as usize;
            self.sum.completion_tokens += row.completion_tokens as usize;
            self.sum.cached_prompt_tokens += row.cached_prompt_tokens as usize;
            sink.push(row)?;
        }
        Ok(())
    }

    /// The token masks of the constrained requests that sample this step
    /// (in parallel on host threads).
    fn compute_masks(&mut self, plan: &StepPlan) {
        // Unconstrained steps cost one lookup per sampling chunk.
        let guided: std::collections::HashSet<SeqId> = plan
            .chunks
            .iter()
            .filter(|c| c.samples && self.sched.request(c.seq).guide.is_some())
            .map(|c| c.seq)
            .collect();
        if !guided.is_empty() {
            crate::guide::compute_masks(self.sched.guides_mut(&guided), self.vocab);
        }
    }

    /// Forks the pending samples of every request whose prompt's logits
    /// this step sampled: each child shares the parent's blocks and draws
    /// its first token from the same logits row with its own RNG (its
    /// chunk, span and pick are appended as copies of the parent's).
    fn fork_samples(
        &mut self,
        plan: &mut StepPlan,
        out: &mut StepLogits,
        picks: &mut Vec<Option<Picked>>,
    ) {
        for i in 0..plan.chunks.len() {
            let c = plan.chunks[i];
            if !c.samples {
                continue;
            }
            let forks: Vec<u32> = self.sched.request(c.seq).fork_indices().to_vec();
            for index in forks {
                let child = SeqId(self.next_id);
                self.next_id += 1;
                self.sched.fork(c.seq, child, index);
                plan.chunks.push(Chunk { seq: child, ..c });
                out.spans.push(out.spans[i]);
                picks.push(picks[i].clone());
            }
        }
    }

    /// Final counters, once no step is left.
    pub fn finish(mut self, runner: &dyn ModelRunner) -> JobSummary {
        self.sum.peak_device_bytes = runner.peak_device_bytes();
        self.sum.breakdown = runner.breakdown();
        let stats = self.sched.stats();
        self.sum.prefix_hit_tokens = stats.kv.hit_tokens as usize;
        self.sum.preemptions = stats.preemptions as usize;
        self.sum.wall_s = self.start.elapsed().as_secs_f64();
        self.sum
    }

    fn mark_admitted(&mut self, plan: &StepPlan) {
        let now = Instant::now();
        let queue_ms = ms(self.start, now);
        for c in &plan.chunks {
            let t = &mut self.sched.request_mut(c.seq).timings;
            if t.admitted.is_none() {
                t.admitted = Some(now);
                t.queue_ms = queue_ms;
            }
        }
    }

    pub(super) fn count(&mut self, plan: &StepPlan) {
        self.sum.steps += 1;
        let tokens: usize = plan.chunks.iter().map(|c| c.len).sum();
        self.sum.forward_tokens += tokens;
        self.sum.prefill_tokens += plan
            .chunks
            .iter()
            .map(|c| {
                let prompt = self.sched.request(c.seq).prompt_len();
                (c.start + c.len).min(prompt).saturating_sub(c.start)
            })
            .sum::<usize>();
        let decodes = plan.chunks.iter().filter(|c| c.len == 1 && c.samples);
        let (used, free) = self.sched.blocks();
        let stats = self.sched.stats();
        tracing::debug!(
            step = self.sum.steps,
            seqs = plan.chunks.len(),
            tokens,
            decode_tokens = decodes.count(),
            blocks_used = used,
            blocks_free = free,
            cache_hit_tokens = stats.kv.hit_tokens,
            preemptions = stats.preemptions,
            "step"
        );
    }
}

/// Host wall time per phase of a step (`runner bench --breakdown`).
pub(super) struct PhaseClock {
    last: Instant,
    pub(super) phases: Vec<(&'static str, f64)>,
}

impl PhaseClock {
    pub(super) fn start() -> Self {
        Self {
            last: Instant::now(),
            phases: Vec::with_capacity(6),
        }
    }

    /// The time since the last lap belongs to `phase`.
    pub(super) fn lap(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.phases.push((phase, ms(self.last, now)));
        self.last = now;
    }

    /// The time since the last lap is not the host's own (the forward).
    pub(super) fn skip(&mut self) {
        self.last = Instant::now();
    }
}
