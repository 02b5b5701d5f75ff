//! Decode steps replayed from CUDA graphs (`engine.cuda_graphs`): a decode
//! step's forward is captured once per (tokens, block-table width, decode
//! partitions) and replayed for later steps of that key with their inputs
//! copied into the graph's, so the device runs the step's ~300 kernels
//! without a launch gap from the host between each two (run 67 on an H200:
//! a decode step 6-11% faster replayed than queued eagerly). Each token
//! count has its own graph, with the eager forward's kernels: the logits
//! are bit for bit the eager ones.

use super::{LogitRows, Mistral, PagedKvCache, SeqChunk};
use crate::backend::timeline::Timeline;
use crate::backend::Batch;
use crate::model::patch::IdPatch;
use crate::Result;
use candle_core::{DType, Tensor};
use std::collections::HashMap;

/// (tokens, block-table width, decode partitions per sequence).
type Key = (usize, usize, usize);

/// Graphs kept at once; the least recently replayed goes first.
const CAP: usize = 8;

/// A captured step and the inputs and output it was captured with.
struct Entry {
    key: Key,
    graph: crate::cuda::Graph,
    /// The graph's inputs: a replay copies the step's own into them.
    batch: Batch,
    /// Embedding rows [tokens, hidden].
    x0: Tensor,
    /// f32 logits [tokens, vocab], written by every replay.
    out: Tensor,
    used: u64,
}

/// The decode graphs of one runner.
#[derive(Default)]
pub struct DecodeGraphs {
    entries: Vec<Entry>,
    /// Steps seen per key without a graph; `u32::MAX` marks a key whose
    /// capture failed (never tried again).
    seen: HashMap<Key, u32>,
    tick: u64,
    /// Steps replayed and graphs captured so far.
    pub replays: usize,
    pub captures: usize,
    /// `RUNNER_GRAPH_CHECK=1` (a diagnostic): each graph's logits are
    /// compared with the eager forward's, and the difference logged.
    check: bool,
}

impl DecodeGraphs {
    /// An empty set (checking against the eager forward where the
    /// environment asks for it).
    pub fn new() -> Self {
        Self {
            check: std::env::var("RUNNER_GRAPH_CHECK").is_ok_and(|v| v == "1"),
            ..Self::default()
        }
    }
}

/// Logs the largest difference between a graph's logits and the eager ones.
fn check(graph: &Tensor, eager: &Tensor, what: &str, key: Option<Key>) -> Result<()> {
    let diff = (graph - eager)?.abs()?.max_all()?.to_scalar::<f32>()?;
    tracing::info!(what, ?key, diff, "graph check");
    Ok(())
}

impl DecodeGraphs {
    /// Whether a step of `key` (which has no graph) should be captured: a
    /// key's second step is, so a batch size seen once costs no capture.
    fn wants_capture(&mut self, key: Key) -> bool {
        let n = self.seen.entry(key).or_insert(0);
        if *n == u32::MAX {
            return false;
        }
        *n += 1;
        *n >= 2
    }

    /// Keeps a new graph, dropping the least recently used beyond [`CAP`].
    fn insert(&mut self, e: Entry) {
        self.seen.remove(&e.key);
        if self.entries.len() >= CAP {
            if let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].used) {
                self.entries.swap_remove(i);
            }
        }
        self.entries.push(e);
        self.captures += 1;
    }
}

/// The key of a step whose logits rows are all its rows in order and whose
/// batch a graph can hold ([`crate::cuda::GpuBatch::graph_key`]).
fn key_of(batch: &Batch, rows: LogitRows<'_>, tokens: usize) -> Option<Key> {
    let in_order = match rows {
        LogitRows::All => true,
        LogitRows::These(r) => r.len() == tokens && r.iter().zip(0..).all(|(&r, i)| r == i),
        LogitRows::LastOfEachChunk => false,
    };
    let (width, parts) = batch.gpu.as_ref()?.graph_key()?;
    in_order.then_some((tokens, width, parts))
}

impl Mistral {
    /// [`Mistral::forward_timed`] without timing, through a graph of
    /// `graphs` where the step is a decode step: replayed if its key has
    /// one, captured (then replayed) at the key's second step, else run
    /// eagerly. Returns a fresh logits tensor either way.
    pub fn forward_graphed(
        &self,
        graphs: &mut DecodeGraphs,
        chunks: &[SeqChunk<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows<'_>,
        patch: Option<&IdPatch>,
    ) -> Result<Tensor> {
        let (batch, x0) = self.inputs(chunks, cache, patch)?;
        let tokens = x0.dim(0)?;
        let key = key_of(&batch, rows, tokens);
        graphs.tick += 1;
        let tick = graphs.tick;
        if let Some(e) = key.and_then(|k| graphs.entries.iter_mut().find(|e| e.key == k)) {
            e.used = tick;
            e.x0.slice_set(&x0, 0, 0)?;
            e.batch.positions.slice_set(&batch.positions, 0, 0)?;
            if let (Some(src), Some(dst)) = (&batch.gpu, &e.batch.gpu) {
                src.copy_into(dst)?;
            }
            e.graph.launch()?;
            graphs.replays += 1;
            let logits = e.out.copy()?;
            if graphs.check {
                let eager =
                    self.compute(chunks, (&batch, &x0), cache, rows, &mut Timeline::off())?;
                check(&logits, &eager, "replay", key)?;
            }
            return Ok(logits);
        }
        let mut off = Timeline::off();
        let Some(key) = key.filter(|&k| graphs.wants_capture(k)) else {
            return self.compute(chunks, (&batch, &x0), cache, rows, &mut off);
        };
        let out = Tensor::zeros((tokens, self.cfg.vocab_size), DType::F32, &self.device)?;
        let graph = crate::cuda::capture(&self.device, || {
            let logits = self.compute(chunks, (&batch, &x0), cache, rows, &mut Timeline::off())?;
            Ok(out.slice_set(&logits, 0, 0)?)
        })?;
        let Some(graph) = graph else {
            graphs.seen.insert(key, u32::MAX);
            return self.compute(chunks, (&batch, &x0), cache, rows, &mut off);
        };
        graph.launch()?;
        let logits = out.copy()?;
        if graphs.check {
            let eager = self.compute(chunks, (&batch, &x0), cache, rows, &mut Timeline::off())?;
            check(&logits, &eager, "capture", Some(key))?;
        }
        graphs.insert(Entry {
            key,
            graph,
            batch,
            x0,
            out,
            used: tick,
        });
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_captured_at_its_second_step_and_never_after_a_failure() {
        let mut g = DecodeGraphs::default();
        assert!(!g.wants_capture((64, 16, 1)));
        assert!(!g.wants_capture((128, 16, 1)));
        assert!(g.wants_capture((64, 16, 1)));
        g.seen.insert((128, 16, 1), u32::MAX);
        assert!(!g.wants_capture((128, 16, 1)));
        assert!(!g.wants_capture((128, 16, 1)));
    }
}
