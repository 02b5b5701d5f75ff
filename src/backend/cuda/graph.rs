//! CUDA graphs: a forward captured once and replayed, so the device runs
//! its kernels without a launch from the host between each two.

use super::cuda;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::Device;

/// An instantiated graph of the work queued on a device's stream.
pub struct Graph(CudaGraph);

// SAFETY: a graph is not internally synchronized, so it must never be used
// from two threads at once; a `Graph` is only reachable through the one
// engine runner that owns it (`&mut` access), which uses it from one thread
// at a time, and moving it between threads is allowed by CUDA.
unsafe impl Send for Graph {}

/// Captures the work `f` queues on `dev`'s stream into a graph (nothing
/// runs). `None` (with the reason logged) where the capture failed: `f`
/// did something a graph cannot hold, such as a copy from pageable host
/// memory; the stream is out of capture mode either way.
pub fn capture(dev: &Device, f: impl FnOnce() -> Result<()>) -> Result<Option<Graph>> {
    let cd = cuda(dev)?;
    let stream = cd.cuda_stream();
    // Thread-local: a call of this thread that a graph cannot hold (a
    // synchronous copy, a wait) fails the capture instead of running.
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    if let Err(e) = stream.begin_capture(mode) {
        tracing::warn!("cuda graph capture failed to start: {e}");
        return Ok(None);
    }
    // candle copies some kernels' shapes from host memory at each call; a
    // graph would replay the copy from a buffer freed since. With its
    // parameter cache on, such a copy fails the capture instead.
    let ran = {
        let _cache = cd.enable_cuda_graph_htod_cache();
        f()
    };
    match (ran, stream.end_capture(sys::CUgraphInstantiate_flags(0))) {
        (Ok(()), Ok(Some(g))) => Ok(Some(Graph(g))),
        (ran, ended) => {
            tracing::warn!(
                "cuda graph capture failed: {:?} / {:?}",
                ran.err(),
                ended.err()
            );
            dev.synchronize()?;
            Ok(None)
        }
    }
}

impl Graph {
    /// Queues the graph's work on the stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        self.0
            .launch()
            .map_err(|e| Error::Device(format!("cuda graph launch failed: {e}")))
    }
}
