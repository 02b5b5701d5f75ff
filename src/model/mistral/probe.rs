//! A diagnostic of what a CUDA graph would take off a step
//! (`RUNNER_GRAPH_PROBE=1` with `RUNNER_PROFILE_STEPS`): the same forward
//! queued back to back, eagerly and replayed from a graph. Kernel launch
//! gaps, which a graph shortens, are the difference.

use super::{LogitRows, Mistral, PagedKvCache, SeqChunk};
use crate::backend::timeline::Timeline;
use crate::model::patch::IdPatch;
use crate::Result;
use candle_core::Device;
use std::time::Instant;

/// Seconds per call of `f`, queued `iters` times between two waits for
/// the device (the median of 5), after one call that loads what it needs.
fn eager_time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    dev.synchronize()?;
    let mut v = Vec::with_capacity(5);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[2])
}

impl Mistral {
    /// Milliseconds per forward of `chunks` queued `iters` times back to
    /// back: (eagerly, replayed from a CUDA graph; `None` where the capture
    /// failed, e.g. a step that copies from the host inside its forward).
    /// Each run writes the step's own cache rows with the same values.
    pub fn probe_graph(
        &self,
        chunks: &[SeqChunk<'_>],
        cache: &mut PagedKvCache,
        rows: LogitRows<'_>,
        patch: Option<&IdPatch>,
    ) -> Result<(f64, Option<f64>)> {
        const ITERS: usize = 3;
        let (batch, x0) = self.inputs(chunks, cache, patch)?;
        let mut run = || -> Result<()> {
            let mut off = Timeline::off();
            self.compute(chunks, (&batch, &x0), cache, rows, &mut off)
                .map(drop)
        };
        let eager = eager_time(&self.device, ITERS, &mut run)?;
        let graph = match self.device {
            Device::Cuda(_) => crate::cuda::graph_time(&self.device, ITERS, run)?,
            _ => None,
        };
        Ok((eager * 1e3, graph.map(|g| g * 1e3)))
    }
}
