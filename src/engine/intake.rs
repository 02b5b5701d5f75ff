//! Admission from the reader: prepared records become requests (a
//! look-ahead window sorted by prompt tokens puts records that share a
//! prefix next to each other); records that cannot run become error rows.

use super::rows::error_row;
use super::step::Pipeline;
use super::tokenize::Prepared;
use crate::config::GenerationParams;
use crate::input::RecordError;
use crate::output::RowSink;
use crate::scheduler::{RecordRef, Request};
use crate::Result;
use std::sync::mpsc::{Receiver, TryRecvError};

/// Reads prepared records into the pipeline.
pub struct Intake<'a> {
    rx: &'a Receiver<Result<Prepared>>,
    defaults: &'a GenerationParams,
    /// Records looked at together before sorting.
    lookahead: usize,
    /// Keep this many requests waiting.
    want_waiting: usize,
    /// Score requests instead of generation requests.
    score: bool,
    /// Ask generation requests for their prompts' log-probabilities.
    pub prompt_logprobs: bool,
    /// Matchers for constrained records.
    pub guides: Option<&'a crate::guide::LazyGuides>,
    exhausted: bool,
}

impl<'a> Intake<'a> {
    /// Intake from `rx`; `max_num_seqs` sets the window (4x) and how many
    /// requests are kept waiting.
    pub fn new(
        rx: &'a Receiver<Result<Prepared>>,
        defaults: &'a GenerationParams,
        max_num_seqs: usize,
        score: bool,
    ) -> Self {
        Self {
            rx,
            defaults,
            lookahead: 4 * max_num_seqs,
            want_waiting: max_num_seqs,
            score,
            prompt_logprobs: false,
            guides: None,
            exhausted: false,
        }
    }

    /// A smaller window: at most `n` records read ahead and `n` kept
    /// waiting (an engine of a fleet takes only what it will run soon, so
    /// that the others find work to the end).
    pub fn with_window(mut self, n: usize) -> Self {
        self.lookahead = n.max(1);
        self.want_waiting = n.max(1);
        self
    }

    /// Reads what is ready (waiting for one record when nothing else is
    /// in flight) and queues it; a fatal input error ends the run.
    pub fn fill(&mut self, pipe: &mut Pipeline<'_>, sink: &mut dyn RowSink) -> Result<()> {
        if self.exhausted || pipe.sched.waiting() >= self.want_waiting {
            return Ok(());
        }
        let mut fresh: Vec<Request> = Vec::new();
        while fresh.len() < self.lookahead {
            let next = if fresh.is_empty() && pipe.sched.is_empty() {
                self.rx.recv().ok()
            } else {
                match self.rx.try_recv() {
                    Ok(x) => Some(x),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => None,
                }
            };
            let Some(item) = next else {
                self.exhausted = true;
                break;
            };
            let (rec, tokens) = item?;
            let samples = rec.pending_samples(self.defaults);
            if samples.is_empty() {
                continue;
            }
            let (tokens, guide) = self.guide_of(&rec, tokens);
            let tokens = stop_ids_in(&rec, tokens, pipe.vocab);
            match tokens {
                Err(err) => {
                    tracing::warn!(record = %rec.id, "{err}");
                    for &index in &samples {
                        pipe.sum.errors += 1;
                        pipe.sum.records += 1;
                        let mut row = error_row(&rec, &err, pipe.elapsed_ms(), self.defaults);
                        row.sample_index = index;
                        sink.push(row)?;
                    }
                }
                Ok(t) => {
                    let (params, reference) = match rec.body {
                        Ok(b) => (b.params, b.reference),
                        Err(_) => (self.defaults.clone(), None),
                    };
                    let record = RecordRef {
                        id: rec.id,
                        row: rec.row,
                        reference,
                        passthrough: rec.passthrough,
                    };
                    fresh.push(if self.score {
                        Request::score(record, t.tokens, t.prompt_len, params)
                    } else {
                        let mut r =
                            Request::generate(record, t.tokens, params).with_samples(&samples);
                        r.guide = guide;
                        match self.prompt_logprobs {
                            true => r.with_prompt_logprobs(),
                            false => r,
                        }
                    });
                }
            }
        }
        fresh.sort_by(|a, b| a.tokens().cmp(b.tokens()));
        for req in fresh {
            pipe.add(req);
        }
        Ok(())
    }
}

impl Intake<'_> {
    /// The matcher of a constrained generation record; a constraint that
    /// does not compile makes the record an error.
    fn guide_of(
        &self,
        rec: &crate::input::InputRecord,
        tokens: std::result::Result<super::Tokenized, RecordError>,
    ) -> (
        std::result::Result<super::Tokenized, RecordError>,
        Option<crate::guide::Guide>,
    ) {
        let constraint = rec
            .body
            .as_ref()
            .ok()
            .and_then(|b| b.params.constraint.as_ref());
        let Some(c) = constraint.filter(|_| tokens.is_ok() && !self.score) else {
            return (tokens, None);
        };
        let guides = self.guides.expect("the engine passes guides");
        match guides.guide(c) {
            Ok(g) => (tokens, Some(g)),
            Err(e) => (
                Err(RecordError::Field(format!(
                    "record {}: `{}` {e}",
                    rec.id,
                    c.key()
                ))),
                None,
            ),
        }
    }
}

/// A record whose `stop_token_ids` name an id past the model's vocabulary
/// (`vocab`; 0: not known, no check) is an error: no such token is ever
/// generated, so the stop could never apply (a wrong tokenizer's ids, or
/// a typo).
fn stop_ids_in(
    rec: &crate::input::InputRecord,
    tokens: std::result::Result<super::Tokenized, RecordError>,
    vocab: usize,
) -> std::result::Result<super::Tokenized, RecordError> {
    let stops = rec.body.as_ref().map(|b| &b.params.stop_token_ids);
    match (tokens, stops) {
        (Ok(t), Ok(ids)) if vocab > 0 => match ids.iter().find(|&&i| i as usize >= vocab) {
            Some(bad) => Err(RecordError::Field(format!(
                "record {}: `stop_token_ids` holds {bad}, past the model's vocabulary of {vocab} tokens (0..{})",
                rec.id,
                vocab - 1
            ))),
            None => Ok(t),
        },
        (tokens, _) => tokens,
    }
}
