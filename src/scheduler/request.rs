//! One request: everything about a record in flight, owned by the
//! scheduler from admission to its finished row.

use crate::config::GenerationParams;
use crate::kv::BlockTable;
use crate::sampler::RecordRng;
use std::time::Instant;

/// What a request asks of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Generate tokens after the prompt.
    Generate,
    /// Score the tokens after `prompt_len` (the continuation): the
    /// log-probability of each under the model, nothing generated.
    Score,
}

/// The record a request came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordRef {
    /// Record id.
    pub id: String,
    /// 0-based input row.
    pub row: u64,
    /// Reference answer (scoring jobs).
    pub reference: Option<String>,
    /// The record's passthrough cells (one row), copied to its output row.
    pub passthrough: Option<arrow::array::RecordBatch>,
}

/// When things happened to a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// First scheduled.
    pub admitted: Option<Instant>,
    /// Admission time minus the job's start, in ms.
    pub queue_ms: f64,
    /// First generated token.
    pub first_token: Option<Instant>,
}

/// A record in flight: its tokens and cache state (the scheduler's part),
/// its sampling settings and RNG, timings and scores (the engine's part).
#[derive(Debug)]
pub struct Request {
    /// Where it came from.
    pub record: RecordRef,
    /// Generate or score.
    pub kind: RequestKind,
    /// Sampling and stopping parameters.
    pub params: GenerationParams,
    /// The sample's own RNG, seeded from (seed, record id, sample index).
    pub rng: RecordRng,
    /// Which of the record's samples this is (`generation.n`).
    pub sample_index: u32,
    /// Sample indices still to fork from this request when its prompt's
    /// logits are first sampled (they share its prompt blocks).
    pub(super) forks: Vec<u32>,
    /// When it was admitted and produced its first token.
    pub timings: Timings,
    /// Score requests: per continuation token, its log-probability once its
    /// logits row has run (a recompute after preemption overwrites it).
    pub token_logprobs: Vec<Option<f64>>,
    /// Generation requests with `output.logprobs`: the sampled tokens'
    /// log-probabilities so far.
    pub logprobs: Option<crate::output::TokenLogprobs>,
    /// Generation requests with `output.prompt_logprobs`: per prompt
    /// token, its log-probability once its row has run (`None` for the
    /// first token, which nothing predicts).
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Constrained requests: the matcher of the record's constraint.
    pub guide: Option<crate::guide::Guide>,
    pub(super) tokens: Vec<u32>,
    pub(super) prompt_len: usize,
    pub(super) computed: usize,
    pub(super) committed: usize,
    pub(super) table: Option<BlockTable>,
    pub(super) cached_prompt_tokens: usize,
    /// Hash of the first full block (holds back requests whose prefix
    /// another request is computing right now).
    pub(super) first_block: Option<u64>,
    /// Prompt blocks whose log-probabilities are kept for reuse.
    pub(super) lps_kept: super::prompt_lps::Kept,
}

impl Request {
    /// A generation request for a tokenized prompt.
    pub fn generate(record: RecordRef, prompt: Vec<u32>, params: GenerationParams) -> Self {
        let rng = RecordRng::new(params.seed, &record.id);
        let prompt_len = prompt.len();
        Self::new(
            record,
            RequestKind::Generate,
            prompt,
            prompt_len,
            params,
            rng,
        )
    }

    /// A scoring request: `tokens` is prompt + continuation, the
    /// continuation starting at `prompt_len` (at least one token).
    pub fn score(
        record: RecordRef,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: GenerationParams,
    ) -> Self {
        let rng = RecordRng::new(params.seed, &record.id);
        Self::new(record, RequestKind::Score, tokens, prompt_len, params, rng)
    }

    fn new(
        record: RecordRef,
        kind: RequestKind,
        tokens: Vec<u32>,
        prompt_len: usize,
        params: GenerationParams,
        rng: RecordRng,
    ) -> Self {
        assert!(!tokens.is_empty(), "empty prompt");
        assert!(prompt_len <= tokens.len(), "prompt longer than its tokens");
        let scored = tokens.len() - prompt_len.max(1);
        Self {
            record,
            kind,
            params,
            rng,
            sample_index: 0,
            forks: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            guide: None,
            timings: Timings::default(),
            token_logprobs: match kind {
                RequestKind::Generate => Vec::new(),
                RequestKind::Score => vec![None; scored],
            },
            tokens,
            prompt_len,
            computed: 0,
            committed: 0,
            table: None,
            cached_prompt_tokens: 0,
            first_block: None,
            lps_kept: Default::default(),
        }
    }

    /// Makes this request produce samples `indices` of its record (the
    /// first itself, the others forked from it after the prompt's prefill).
    pub fn with_samples(mut self, indices: &[u32]) -> Self {
        let (&first, rest) = indices.split_first().expect("at least one sample");
        self.sample_index = first;
        self.rng = RecordRng::for_sample(self.params.seed, &self.record.id, first);
        self.forks = rest.to_vec();
        self
    }

    /// Asks for the prompt tokens' log-probabilities (`prompt_logprobs`).
    pub fn with_prompt_logprobs(mut self) -> Self {
        if self.kind == RequestKind::Generate {
            self.prompt_logprobs = Some(vec![None; self.prompt_len]);
        }
        self
    }

    /// Whether prompt log-probabilities are asked for and some are still
    /// missing (their positions must be computed, or their values found
    /// kept for the cached blocks reused).
    pub fn scores_prompt(&self) -> bool {
        self.prompt_logprobs
            .as_ref()
            .is_some_and(|v| v.iter().skip(1).any(Option::is_none))
    }

    /// Sample indices still to fork from this request.
    pub fn fork_indices(&self) -> &[u32] {
        &self.forks
    }

    /// A sample of the same record sharing this request's tokens (its
    /// table is set by the scheduler).
    pub(super) fn child(&self, index: u32) -> Self {
        Self {
            record: self.record.clone(),
            kind: self.kind,
            params: self.params.clone(),
            rng: RecordRng::for_sample(self.params.seed, &self.record.id, index),
            sample_index: index,
            forks: Vec::new(),
            timings: self.timings,
            token_logprobs: self.token_logprobs.clone(),
            logprobs: None,
            prompt_logprobs: self.prompt_logprobs.clone(),
            guide: self.guide.as_ref().map(crate::guide::Guide::fork),
            tokens: self.tokens.clone(),
            prompt_len: self.prompt_len,
            computed: self.computed,
            committed: self.committed,
            table: None,
            // Every prompt token comes from the shared blocks.
            cached_prompt_tokens: self.prompt_len,
            first_block: self.first_block,
            lps_kept: self.lps_kept,
        }
    }

    /// The record's (or sample's) sampling RNG, as it stands.
    pub fn rng(&self) -> &RecordRng {
        &self.rng
    }

    /// Prompt and generated (or continuation) tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Prompt tokens.
    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens after the prompt (generated, or the scored continuation).
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Prompt tokens reused from the prefix cache at (first) admission.
    pub fn cached_prompt_tokens(&self) -> usize {
        self.cached_prompt_tokens
    }

    /// The tokens whose cached blocks admission may reuse: a scoring
    /// request computes every position from its prompt's last token on
    /// (their logits score the continuation), so only blocks of the prompt
    /// before that can come from the cache. (A generation request that
    /// still scores its prompt reuses only the leading blocks whose prompt
    /// log-probabilities are kept: admission cuts this prefix there.)
    pub(super) fn reusable_prefix(&self) -> &[u32] {
        match self.kind {
            RequestKind::Generate => &self.tokens,
            RequestKind::Score => &self.tokens[..self.prompt_len.max(1)],
        }
    }

    /// Rows `[from, to)` of the chunk at positions `start..start + len`
    /// whose logits the request needs: for a generation request the
    /// positions predicting prompt tokens still unscored (with
    /// `prompt_logprobs`) and, when it samples, the last one (always the
    /// last row of the span); for a scoring request the positions
    /// predicting continuation tokens.
    pub fn logit_rows(&self, start: usize, len: usize) -> (usize, usize) {
        let end = start + len;
        match self.kind {
            RequestKind::Generate => {
                let samples = end == self.tokens.len();
                let score_to = match self.scores_prompt() {
                    true => (self.prompt_len - 1).min(end),
                    false => start,
                };
                let from = match (score_to > start, samples) {
                    (true, _) => start,
                    (false, true) => end - 1,
                    (false, false) => return (0, 0),
                };
                let to = if samples { end } else { score_to };
                (from - start, to - start)
            }
            RequestKind::Score => {
                // Position p predicts token p + 1; scored tokens are
                // max(prompt_len, 1)..tokens.len().
                let first = self.prompt_len.max(1) - 1;
                let last = self.tokens.len() - 1; // exclusive
                let from = first.max(start).min(end);
                let to = last.min(end).max(from);
                (from - start, to - start)
            }
        }
    }

    /// What a draw needs at once: the parameters and the record's RNG.
    pub fn sampling_parts(&mut self) -> (&GenerationParams, &mut RecordRng) {
        (&self.params, &mut self.rng)
    }

    /// Whether every continuation token has its log-probability.
    pub fn fully_scored(&self) -> bool {
        self.token_logprobs.iter().all(Option::is_some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GenerationParams {
        GenerationParams {
            max_new_tokens: 4,
            ..Default::default()
        }
    }

    #[test]
    fn score_rows_cover_each_continuation_token_once_across_chunks() {
        // 5 prompt tokens, 4 continuation tokens: positions 4..=7 predict 5..=8.
        let r = Request::score(RecordRef::default(), (0..9).collect(), 5, params());
        assert_eq!(r.token_logprobs.len(), 4);
        let mut rows = Vec::new();
        for (start, len) in [(0, 3), (3, 2), (5, 4)] {
            let (a, b) = r.logit_rows(start, len);
            rows.extend((a..b).map(|i| start + i));
        }
        assert_eq!(rows, vec![4, 5, 6, 7]);
        assert_eq!(r.reusable_prefix().len(), 5);
    }

    #[test]
    fn generation_rows_are_the_last_of_the_final_chunk() {
        let r = Request::generate(RecordRef::default(), (0..6).collect(), params());
        assert_eq!(r.logit_rows(0, 4), (0, 0));
        assert_eq!(r.logit_rows(4, 2), (1, 2));
    }
}
