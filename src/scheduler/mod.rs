//! Iteration-level continuous batching (pure CPU: no candle, no tokio).
//!
//! Each step gets a token budget (`max_batch_tokens`) and a sequence cap
//! (`max_num_seqs`): running decodes first, then prefill chunks of running
//! sequences (chunked prefill), then new sequences admitted while blocks
//! allow. When blocks run out, the youngest running sequence is preempted by
//! recompute: its blocks are freed and it goes back to the front of the
//! queue, keeping the tokens it generated.

mod prompt_lps;
mod request;

use prompt_lps::PromptLps;
pub use request::{RecordRef, Request, RequestKind, Timings};

use crate::kv::{BlockAllocator, BlockCopy, BlockId, BlockTable, KvStats};
use std::collections::{HashMap, VecDeque};

/// A sequence handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// Scheduler limits.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens per step.
    pub max_batch_tokens: usize,
    /// Blocks in the KV cache.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Share full prompt blocks between sequences.
    pub prefix_caching: bool,
}

/// Whether a sequence `o` that has committed `committed` tokens will still
/// commit a whole block that another sequence `s` could reuse: the common
/// prefix of their first `limit` tokens reaches past o's next block
/// boundary. Only the tokens up to that boundary are compared (one memcmp;
/// none once `o` has committed every block the limit allows), so admission
/// costs little when many running sequences share a long prompt prefix.
fn reuse_pending(o: &[u32], s: &[u32], committed: usize, limit: usize, bs: usize) -> bool {
    // common / bs * bs > committed  <=>  common >= need.
    let need = (committed / bs + 1) * bs;
    need <= limit && o[..need] == s[..need]
}

#[cfg(test)]
impl SchedulerConfig {
    /// Blocks of 4 tokens with prefix caching: the unit tests' cache.
    pub(crate) fn tiny(num_blocks: usize, max_num_seqs: usize, max_batch_tokens: usize) -> Self {
        Self {
            max_num_seqs,
            max_batch_tokens,
            num_blocks,
            block_size: 4,
            prefix_caching: true,
        }
    }
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence.
    pub seq: SeqId,
    /// Position of the first token.
    pub start: usize,
    /// Tokens in the chunk.
    pub len: usize,
    /// Whether the chunk ends at the sequence's last token (its logits are sampled).
    pub samples: bool,
}

/// What one step runs.
#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    /// Chunks, decodes first.
    pub chunks: Vec<Chunk>,
    /// Block copies to do before the forward.
    pub copies: Vec<BlockCopy>,
    /// Sequences preempted in this step.
    pub preempted: Vec<SeqId>,
}

/// Counters of the scheduler.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Preemptions by recompute.
    pub preemptions: u64,
    /// KV counters.
    pub kv: KvStats,
}

/// The continuous-batching scheduler.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    waiting: VecDeque<SeqId>,
    /// Running sequences, oldest admission first.
    running: Vec<SeqId>,
    seqs: HashMap<SeqId, Request>,
    preemptions: u64,
    /// Prompt log-probabilities of cached blocks (prefix caching only).
    lps: PromptLps,
}

impl Scheduler {
    /// A scheduler with an empty cache.
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            alloc: BlockAllocator::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching),
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            seqs: HashMap::new(),
            preemptions: 0,
            lps: PromptLps::new(if cfg.prefix_caching {
                cfg.num_blocks
            } else {
                0
            }),
        }
    }

    /// Queues a request.
    pub fn add(&mut self, id: SeqId, mut req: Request) {
        let bs = self.cfg.block_size;
        let prefix = req.reusable_prefix();
        req.first_block = (prefix.len() > bs).then(|| crate::kv::block_hash(None, &prefix[..bs]));
        self.seqs.insert(id, req);
        self.waiting.push_back(id);
    }

    /// Sequences waiting or running.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether nothing is waiting or running.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Sequences waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Blocks (used, free).
    pub fn blocks(&self) -> (usize, usize) {
        (self.alloc.used(), self.alloc.available())
    }

    /// Counters.
    pub fn stats(&self) -> SchedStats {
        SchedStats {
            preemptions: self.preemptions,
            kv: self.alloc.stats(),
        }
    }

    /// A request in flight.
    pub fn request(&self, id: SeqId) -> &Request {
        &self.seqs[&id]
    }

    /// Keeps the prompt log-probabilities of `id`'s prompt blocks whose
    /// values are all known by now, for later requests with the same
    /// prefix (they reuse those blocks instead of computing them).
    pub fn keep_prompt_logprobs(&mut self, id: SeqId) {
        if !self.cfg.prefix_caching {
            return; // nothing is reused
        }
        let bs = self.cfg.block_size;
        let store = &mut self.lps;
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        if let Some(lps) = s.prompt_logprobs.as_ref() {
            s.lps_kept = store.keep(&s.tokens, s.prompt_len, bs, lps, s.lps_kept);
        }
    }

    /// A request in flight, for the engine's part of its state.
    pub fn request_mut(&mut self, id: SeqId) -> &mut Request {
        self.seqs.get_mut(&id).expect("known sequence")
    }

    /// A sequence's tokens (prompt + generated).
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        &self.seqs[&id].tokens
    }

    /// A sequence's blocks.
    pub fn block_table(&self, id: SeqId) -> &[BlockId] {
        self.seqs[&id].table.as_ref().map_or(&[], |t| t.blocks())
    }

    /// Prompt tokens reused from the prefix cache at (first) admission.
    pub fn cached_prompt_tokens(&self, id: SeqId) -> usize {
        self.seqs[&id].cached_prompt_tokens
    }

    /// Forks sample `index` of `parent`'s record as `child`: a running
    /// request sharing every block of the parent (copy-on-write on its
    /// first write into the shared partial block). Takes `index` off the
    /// parent's pending forks.
    pub fn fork(&mut self, parent: SeqId, child: SeqId, index: u32) {
        let p = self.seqs.get_mut(&parent).expect("known sequence");
        p.forks.retain(|&i| i != index);
        let mut req = p.child(index);
        req.table = p.table.as_ref().map(|t| self.alloc.fork(t));
        self.seqs.insert(child, req);
        self.running.push(child);
    }

    /// Running sequences plus the samples they will still fork.
    fn occupancy(&self) -> usize {
        self.running.len()
            + self
                .running
                .iter()
                .map(|id| self.seqs[id].forks.len())
                .sum::<usize>()
    }

    /// The guides of the constrained requests among `ids`.
    pub fn guides_mut(
        &mut self,
        ids: &std::collections::HashSet<SeqId>,
    ) -> Vec<&mut crate::guide::Guide> {
        self.seqs
            .iter_mut()
            .filter(|(id, _)| ids.contains(id))
            .filter_map(|(_, r)| r.guide.as_mut())
            .collect()
    }

    /// Appends a sampled token.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        self.request_mut(id).tokens.push(token);
    }

    /// Takes back the newest token (the overlapped step's placeholder,
    /// before the sampled token replaces it).
    pub fn pop_token(&mut self, id: SeqId) -> Option<u32> {
        self.request_mut(id).tokens.pop()
    }

    /// Frees the slot and blocks of a running sequence whose last token
    /// is queued on the device (the overlapped step: it finishes by length
    /// when the token arrives), so that the next step can admit in its
    /// place; it stays known until [`Self::finish`]. Work queued later
    /// reuses its blocks after the device has run the step that reads
    /// them (one stream).
    pub fn retire(&mut self, id: SeqId) {
        let s = self.seqs.get_mut(&id).expect("known sequence");
        if let Some(t) = s.table.take() {
            self.alloc.free(t);
        }
        self.running.retain(|&r| r != id);
    }

    /// Whether `id` is waiting or running (not finished).
    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Removes a finished request, frees its blocks and hands it back.
    pub fn finish(&mut self, id: SeqId) -> Option<Request> {
        let mut req = self.seqs.remove(&id)?;
        if let Some(t) = req.table.take() {
            self.alloc.free(t);
        }
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        Some(req)
    }

    fn preempt_youngest(&mut self, plan: &mut StepPlan) -> Option<SeqId> {
        let id = self.running.pop()?;
        let s = self.seqs.get_mut(&id).expect("running sequence");
        if let Some(t) = s.table.take() {
            self.alloc.free(t);
        }
        s.computed = 0;
        s.committed = 0;
        self.waiting.push_front(id);
        plan.chunks.retain(|c| c.seq != id);
        plan.preempted.push(id);
        self.preemptions += 1;
        Some(id)
    }

    fn grow(&mut self, id: SeqId, n: usize) -> Option<Vec<BlockCopy>> {
        let s = self.seqs.get_mut(&id).expect("known sequence");
        let t = s.table.get_or_insert_with(BlockTable::default);
        self.alloc.grow(t, n)
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_batch_tokens;
        // 1. Decodes, oldest first; preempt the youngest when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            if s.tokens.len() - s.computed != 1 {
                i += 1;
                continue;
            }
            match self.grow(id, 1) {
                Some(copies) => {
                    plan.copies.extend(copies);
                    self.push_chunk(&mut plan, id, 1);
                    budget -= 1;
                    i += 1;
                }
                None => {
                    if self.preempt_youngest(&mut plan) == Some(id) {
                        break;
                    }
                    budget = self.cfg.max_batch_tokens
                        - plan.chunks.iter().map(|c| c.len).sum::<usize>();
                }
            }
        }
        // 2. Prefill chunks of running sequences.
        let ids: Vec<SeqId> = self.running.clone();
        for id in ids {
            let s = &self.seqs[&id];
            let rest = s.tokens.len() - s.computed;
            if rest <= 1 && s.computed > 0 || budget == 0 || plan.chunks.iter().any(|c| c.seq == id)
            {
                continue;
            }
            let n = rest.min(budget);
            if let Some(copies) = self.grow(id, n) {
                plan.copies.extend(copies);
                self.push_chunk(&mut plan, id, n);
                budget -= n;
            }
        }
        // 3. Admit new sequences while the cap, the budget and blocks allow.
        // A record's samples are admitted together (they fork from one
        // prefill); a record with more samples than the cap runs alone.
        while budget > 0 {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let group = 1 + self.seqs[&id].forks.len();
            if !self.running.is_empty() && self.occupancy() + group > self.cfg.max_num_seqs {
                break;
            }
            if self.cfg.prefix_caching && self.prefix_in_flight(id) {
                break;
            }
            let bs = self.cfg.block_size;
            let s = self.seqs.get_mut(&id).expect("waiting sequence");
            // A request still scoring its prompt reuses only the leading
            // blocks whose prompt log-probabilities are kept.
            let kept = (s.kind == RequestKind::Generate && s.scores_prompt())
                .then(|| self.lps.kept(&s.tokens, s.prompt_len, bs));
            let prefix = s.reusable_prefix();
            let prefix = kept
                .as_ref()
                .map_or(prefix, |v| &prefix[..v.len() * bs + 1]);
            let (table, reused) = self.alloc.start(prefix);
            let rest = s.tokens.len() - reused;
            let need = s.tokens.len().div_ceil(bs) - table.blocks().len();
            if need > self.alloc.available() {
                self.alloc.free(table);
                break;
            }
            self.waiting.pop_front();
            let first_admission = match s.kind {
                RequestKind::Generate => s.tokens.len() == s.prompt_len,
                RequestKind::Score => s.cached_prompt_tokens == 0,
            };
            if s.table.is_none() && first_admission {
                s.cached_prompt_tokens = reused;
            }
            s.computed = reused;
            s.committed = reused;
            s.table = Some(table);
            if let (Some(v), Some(lps)) = (kept, s.prompt_logprobs.as_mut()) {
                prompt_lps::fill(lps, &v[..reused / bs], bs);
            }
            self.running.push(id);
            let n = rest.min(budget);
            let copies = self.grow(id, n).expect("blocks were checked");
            plan.copies.extend(copies);
            self.push_chunk(&mut plan, id, n);
            budget -= n;
        }
        // Nothing could run: free room by preempting until something fits
        // (not when every running sequence waits for a token still on its
        // way: the overlapped step's last tokens by length).
        if plan.chunks.is_empty() && self.running.iter().any(|id| self.has_work(*id)) {
            self.preempt_youngest(&mut plan);
            let mut more = self.schedule();
            more.preempted.splice(0..0, plan.preempted);
            return more;
        }
        plan
    }

    /// Whether `id` has tokens to compute.
    fn has_work(&self, id: SeqId) -> bool {
        let s = &self.seqs[&id];
        s.tokens.len() > s.computed
    }

    /// Whether a running sequence is still computing the prompt prefix that
    /// `id` starts with: `id` then waits a step and reuses it instead.
    fn prefix_in_flight(&self, id: SeqId) -> bool {
        let s = &self.seqs[&id];
        let Some(h) = s.first_block else { return false };
        self.running.iter().any(|r| {
            let o = &self.seqs[r];
            if o.first_block != Some(h) {
                return false;
            }
            let limit = o.prompt_len.min(s.prompt_len).saturating_sub(1);
            reuse_pending(
                &o.tokens,
                &s.tokens,
                o.committed,
                limit,
                self.cfg.block_size,
            )
        })
    }

    fn push_chunk(&mut self, plan: &mut StepPlan, id: SeqId, n: usize) {
        let s = self.seqs.get_mut(&id).expect("known sequence");
        let start = s.computed;
        s.computed += n;
        plan.chunks.push(Chunk {
            seq: id,
            start,
            len: n,
            samples: s.computed == s.tokens.len(),
        });
    }

    /// Registers the full blocks a step produced in the prefix cache (call
    /// after the forward that filled them).
    pub fn commit(&mut self, plan: &StepPlan) {
        for c in &plan.chunks {
            if let Some(s) = self.seqs.get_mut(&c.seq) {
                let computed = s.computed;
                s.committed = computed;
                if let Some(t) = s.table.as_mut() {
                    self.alloc.commit(t, &s.tokens[..computed]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare(prompt: Vec<u32>) -> Request {
        let params = crate::config::GenerationParams {
            max_new_tokens: 1,
            ..Default::default()
        };
        Request::generate(RecordRef::default(), prompt, params)
    }

    /// Runs sequences to `gen` generated tokens each with a fake model.
    fn drive(s: &mut Scheduler, n: u64, prompt_len: usize, gen: usize) -> Vec<Vec<u32>> {
        for i in 0..n {
            s.add(
                SeqId(i),
                bare((0..prompt_len as u32).map(|t| t + i as u32 % 2).collect()),
            );
        }
        let mut done = vec![vec![]; n as usize];
        let mut steps = 0;
        while !s.is_empty() {
            steps += 1;
            assert!(steps < 10_000, "scheduler stalled");
            let plan = s.schedule();
            assert!(
                !plan.chunks.is_empty(),
                "a step with work must schedule something"
            );
            assert!(plan.chunks.iter().map(|c| c.len).sum::<usize>() <= s.cfg.max_batch_tokens);
            s.commit(&plan);
            for c in plan.chunks.iter().filter(|c| c.samples) {
                let toks = s.tokens(c.seq);
                let next = toks.iter().sum::<u32>() % 7;
                s.push_token(c.seq, next);
                if s.tokens(c.seq).len() - prompt_len == gen {
                    done[c.seq.0 as usize] = s.tokens(c.seq)[prompt_len..].to_vec();
                    s.finish(c.seq);
                }
            }
        }
        assert_eq!(s.blocks().0, 0, "all blocks returned");
        done
    }

    #[test]
    fn preemption_and_chunking_do_not_change_results() {
        let a = drive(
            &mut Scheduler::new(SchedulerConfig::tiny(200, 1, 1000)),
            6,
            10,
            12,
        );
        let mut tight = Scheduler::new(SchedulerConfig::tiny(12, 4, 5));
        let b = drive(&mut tight, 6, 10, 12);
        assert_eq!(a, b);
        assert!(
            tight.stats().preemptions > 0,
            "the tight cache must preempt"
        );
    }

    #[test]
    fn reuse_pending_is_the_common_prefix_past_the_committed_blocks() {
        // Against the definition: whole blocks of the common prefix (within
        // the limit) beyond what `o` has committed.
        let mut x = 7u64;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize
        };
        for _ in 0..2000 {
            let bs = 1 + next() % 8;
            let n = 1 + next() % 60;
            let o: Vec<u32> = (0..n).map(|_| (next() % 2) as u32).collect();
            let mut s = o.clone();
            let cut = next() % (n + 1);
            for t in &mut s[cut..] {
                *t = 2 + (next() % 2) as u32;
            }
            let limit = next() % (n + 1);
            let committed = next() % (n + 1);
            let common = o[..limit]
                .iter()
                .zip(&s[..limit])
                .take_while(|(a, b)| a == b)
                .count();
            assert_eq!(
                reuse_pending(&o, &s, committed, limit, bs),
                committed < common / bs * bs,
                "bs {bs} limit {limit} committed {committed} cut {cut}"
            );
        }
    }

    #[test]
    fn shared_prompts_hit_the_prefix_cache() {
        let mut s = Scheduler::new(SchedulerConfig::tiny(200, 8, 1000));
        for i in 0..4 {
            s.add(SeqId(i), bare((0..17).collect()));
        }
        // The first computes the shared prefix; the others wait for it and
        // then reuse its 16 tokens.
        let plan = s.schedule();
        assert_eq!(plan.chunks.len(), 1);
        assert_eq!((plan.chunks[0].start, plan.chunks[0].len), (0, 17));
        s.commit(&plan);
        let plan = s.schedule();
        let prefills: Vec<(usize, usize)> = plan
            .chunks
            .iter()
            .filter(|c| c.seq != SeqId(0))
            .map(|c| (c.start, c.len))
            .collect();
        assert_eq!(prefills, vec![(16, 1); 3]);
        assert_eq!(s.cached_prompt_tokens(SeqId(3)), 16);
        assert_eq!(s.stats().kv.hit_tokens, 48);
    }
}
