//! The overlapped step (`engine.overlap`): step n + 1 is scheduled and
//! queued on the device before step n's tokens reach the host, so the GPU
//! does not wait while the host applies tokens, checks stops, writes rows
//! and schedules. A greedy token goes from step n's argmax straight into
//! step n + 1's embedding ([`IdPatch`]); until its id arrives, the
//! sequence holds [`PLACEHOLDER`] in its tokens. A sequence that step n
//! finishes by length is retired when n is queued (step n + 1 admits in
//! its place); one that it finishes by a
//! stop token or string has run one step too many, whose token is
//! dropped. A step that needs the host between its forward and its pick
//! (sampling, penalties, constraints, forks, log-probabilities, the job's
//! or a record's own, scoring, `min_new_tokens` still masking) runs in
//! order, after the step in flight.

use super::pick::Picked;
use super::runner::{ModelRunner, StepLogits};
use super::step::{PhaseClock, Pipeline};
use super::update;
use crate::backend::PendingIds;
use crate::model::IdPatch;
use crate::output::RowSink;
use crate::scheduler::{RequestKind, Scheduler, SeqId, StepPlan};
use crate::Result;
use candle_core::Tensor;
use std::collections::HashMap;

/// What a sequence's tokens hold in place of a token still on the device
/// (never a vocabulary id, so no prefix-cache block can match it).
pub(super) const PLACEHOLDER: u32 = u32::MAX;

/// A step queued on the device whose greedy ids are on their way.
pub(super) struct Inflight {
    /// The step's plan.
    plan: StepPlan,
    /// Per chunk: its row of `ids`, for each generation chunk that samples.
    rows: Vec<Option<u32>>,
    /// Per chunk: a placeholder holds its token's place (else the token is
    /// appended when it arrives: the sequence's last by length, which is
    /// not scheduled meanwhile).
    placed: Vec<bool>,
    /// The greedy ids, u32 `[rows]` on the device.
    ids: Tensor,
    /// The same ids on their way to the host.
    download: PendingIds,
}

impl Inflight {
    /// The rows of `plan`'s flattened batch that read a placeholder, and
    /// where their ids are.
    fn patch(&self, plan: &StepPlan, sched: &Scheduler) -> IdPatch {
        let mut held: HashMap<SeqId, (usize, u32)> = HashMap::new();
        for (i, c) in self.plan.chunks.iter().enumerate() {
            if let (true, Some(r)) = (self.placed[i], self.rows[i]) {
                if sched.contains(c.seq) {
                    held.insert(c.seq, (sched.tokens(c.seq).len() - 1, r));
                }
            }
        }
        let mut p = IdPatch {
            ids: self.ids.clone(),
            rows: Vec::new(),
            src: Vec::new(),
        };
        let mut offset = 0;
        for c in &plan.chunks {
            if let Some(&(pos, r)) = held.get(&c.seq) {
                if (c.start..c.start + c.len).contains(&pos) {
                    p.rows.push((offset + pos - c.start) as u32);
                    p.src.push(r);
                }
            }
            offset += c.len;
        }
        p
    }
}

impl Pipeline<'_> {
    /// One overlapped step: schedule, queue the forward and its greedy
    /// picks, then apply the previous step's tokens while the device runs.
    pub(super) fn step_overlapped(
        &mut self,
        runner: &mut dyn ModelRunner,
        sink: &mut dyn RowSink,
    ) -> Result<()> {
        let mut clock = PhaseClock::start();
        let mut plan = self.schedule_step();
        clock.lap("schedule");
        if plan.chunks.is_empty() || !self.overlappable(&plan) {
            // In order: the step in flight first, then this one without the
            // sequences that step finished.
            let had = self.inflight.is_some();
            self.resolve(sink)?;
            clock.lap("update");
            plan.chunks.retain(|c| self.sched.contains(c.seq));
            if plan.chunks.is_empty() && had {
                runner.note_host(&clock.phases);
                return Ok(()); // the next step schedules what is left
            }
            return self.run_in_order(plan, runner, sink, clock);
        }
        let patch = self.inflight.as_ref().map(|f| f.patch(&plan, &self.sched));
        let out = runner.execute_patched(&plan, &self.sched, patch.as_ref())?;
        let ids = out.logits.argmax(candle_core::D::Minus1)?;
        let download = PendingIds::start(&ids)?;
        clock.skip();
        self.count(&plan);
        self.resolve(sink)?;
        clock.lap("update");
        self.sched.commit(&plan);
        let (rows, placed) = self.hold_places(&plan, &out);
        clock.lap("commit");
        self.inflight = Some(Inflight {
            plan,
            rows,
            placed,
            ids,
            download,
        });
        runner.note_host(&clock.phases);
        Ok(())
    }

    /// Whether a planned step can be queued before the host has the
    /// previous one's tokens: every pick in it is the device's argmax.
    fn overlappable(&self, plan: &StepPlan) -> bool {
        self.logprobs == 0
            && plan.chunks.iter().all(|c| {
                let r = self.sched.request(c.seq);
                let p = &r.params;
                r.kind == RequestKind::Generate
                    && !r.scores_prompt()
                    && (!c.samples
                        || p.temperature == 0.0
                            && p.repetition_penalty == 1.0
                            && p.logprobs.is_none()
                            && r.guide.is_none()
                            && r.fork_indices().is_empty()
                            && r.generated().len() >= p.min_new_tokens)
            })
    }

    /// Applies the step still in flight, if any (the end of a run, or a
    /// stop on request).
    pub fn settle(&mut self, sink: &mut dyn RowSink) -> Result<()> {
        self.resolve(sink)
    }

    /// Waits for the step in flight's ids, applies them as the in-order
    /// step does and writes the rows of the requests they finish.
    fn resolve(&mut self, sink: &mut dyn RowSink) -> Result<()> {
        let Some(f) = self.inflight.take() else {
            return Ok(());
        };
        let ids = f.download.wait()?;
        let mut plan = StepPlan::default();
        let mut picks = Vec::new();
        for (i, c) in f.plan.chunks.iter().enumerate() {
            let Some(r) = f.rows[i] else { continue };
            if !self.sched.contains(c.seq) {
                continue;
            }
            if f.placed[i] {
                let held = self.sched.pop_token(c.seq);
                debug_assert_eq!(held, Some(PLACEHOLDER));
            }
            plan.chunks.push(*c);
            picks.push(Some(Picked::Token(ids[r as usize])));
        }
        let finished = update::apply(&mut self.sched, &plan, picks, &self.stops)?;
        self.write_rows(finished, sink)
    }

    /// Per chunk of a step just queued: its row of the greedy ids (each
    /// live generation chunk that samples) and whether a placeholder now
    /// holds its token's place; a sequence whose token this is its last by
    /// length is retired instead (its slot and blocks go to the next
    /// step's admissions; the token is appended when it arrives).
    fn hold_places(&mut self, plan: &StepPlan, out: &StepLogits) -> (Vec<Option<u32>>, Vec<bool>) {
        let n = plan.chunks.len();
        let (mut rows, mut placed) = (vec![None; n], vec![false; n]);
        for (i, c) in plan.chunks.iter().enumerate() {
            let (first, count) = out.spans[i];
            if !c.samples || count == 0 || !self.sched.contains(c.seq) {
                continue;
            }
            rows[i] = Some((first + count - 1) as u32);
            if self.stops.length_reached(self.sched.request(c.seq), 1) {
                self.sched.retire(c.seq);
            } else {
                self.sched.push_token(c.seq, PLACEHOLDER);
                placed[i] = true;
            }
        }
        (rows, placed)
    }
}
