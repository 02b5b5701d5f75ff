//! The CUDA device a job runs on, and this process's memory on it (the
//! device's default memory pool, where candle allocates every tensor).

use super::cuda;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::CudaDevice;
use candle_core::Device;

/// A CUDA device on its own stream (not the legacy default stream, which
/// cannot be captured into a CUDA graph) whose tensors skip candle's
/// per-use event tracking: this crate runs every kernel on that one stream,
/// where stream order already orders all uses.
pub fn single_stream_device(ordinal: usize) -> Result<Device> {
    let d = CudaDevice::new_with_stream(ordinal)?;
    // SAFETY: every tensor of this device is created and used on its
    // single stream (candle's and our kernels alike), so no cross-stream
    // synchronisation is ever needed.
    unsafe { d.disable_event_tracking() };
    Ok(Device::Cuda(d))
}

/// Visible CUDA devices.
pub fn device_count() -> Result<usize> {
    candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(|e| Error::Device(format!("cannot count CUDA devices: {e}")))
}

/// (free, total) bytes of device memory.
pub fn mem_info() -> Result<(usize, usize)> {
    candle_core::cuda_backend::cudarc::driver::result::mem_get_info()
        .map_err(|e| Error::Device(format!("cuMemGetInfo failed: {e}")))
}

/// The device's default memory pool: candle allocates every tensor there
/// (stream-ordered `cuMemAllocAsync`), so its counters are this process's
/// own tensor memory.
fn default_pool(dev: &Device) -> Result<sys::CUmemoryPool> {
    let d = cuda(dev)?;
    let ctx = d.cuda_stream().context().clone();
    ctx.bind_to_thread()
        .map_err(|e| Error::Device(format!("cuda: cannot bind the context: {e}")))?;
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle comes from
    // a live context.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| Error::Device(format!("cuDeviceGetDefaultMemPool failed: {e}")))?;
    Ok(pool)
}

fn pool_attr(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the four USED/RESERVED attributes are 64-bit values and `v`
    // is a live u64.
    unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
        .result()
        .map_err(|e| Error::Device(format!("cuMemPoolGetAttribute failed: {e}")))?;
    Ok(v)
}

/// Tensor memory of this process on `dev`: (in use now, most in use since
/// the last [`reset_memory_peak`]), in bytes.
pub fn memory_usage(dev: &Device) -> Result<(u64, u64)> {
    let pool = default_pool(dev)?;
    Ok((
        pool_attr(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )?,
        pool_attr(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        )?,
    ))
}

/// Starts a new peak measurement and returns memory the pool holds but
/// does not use to the driver (so `mem_info` sees it as free).
pub fn reset_memory_peak(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    let pool = default_pool(dev)?;
    let mut zero: u64 = 0;
    // SAFETY: USED_MEM_HIGH is reset by writing a 64-bit zero; the pool is
    // the device's default pool and outlives the call.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&mut zero as *mut u64).cast(),
        )
        .result()
        .and_then(|_| sys::cuMemPoolTrimTo(pool, 0).result())
    }
    .map_err(|e| Error::Device(format!("cuda memory pool: {e}")))
}

/// A timing event recorded on a CUDA device's stream.
pub struct Event(candle_core::cuda_backend::cudarc::driver::CudaEvent);

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
    }
}

/// Records an event on `dev`'s stream now (it completes when the work
/// queued before it has run).
pub fn record_event(dev: &Device) -> Result<Event> {
    let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
    cuda(dev)?
        .cuda_stream()
        .record_event(Some(flags))
        .map(Event)
        .map_err(|e| Error::Device(format!("cuda: cannot record an event: {e}")))
}

/// Starts (`on`) or stops the profiler's collection on `dev`'s context,
/// for `ncu --profile-from-start off` (a diagnostic).
pub fn profiler(dev: &Device, on: bool) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
    let d = cuda(dev)?;
    let what = if on { "start" } else { "stop" };
    let fail = |e| Error::Device(format!("cuda: cannot {what} the profiler: {e}"));
    d.cuda_stream().context().bind_to_thread().map_err(fail)?;
    if on {
        profiler_start()
    } else {
        profiler_stop()
    }
    .map_err(fail)
}

impl Event {
    /// Device milliseconds from this event to `end` (waits for both).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        self.0
            .elapsed_ms(&end.0)
            .map(f64::from)
            .map_err(|e| Error::Device(format!("cuda: event timing failed: {e}")))
    }
}

type Pinned = candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u32>;

thread_local! {
    /// Page-locked buffers of finished downloads, for the next ones
    /// (pinning host memory costs more than the copy of a step's ids).
    static PINNED: std::cell::RefCell<Vec<Pinned>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A copy of a u32 tensor to page-locked host memory, queued on the
/// device's stream: it completes when the work queued before it has run,
/// so the host can queue more work and read the ids later.
pub struct Download {
    host: Option<Pinned>,
    done: candle_core::cuda_backend::cudarc::driver::CudaEvent,
    n: usize,
    /// The source stays alive until the copy has run.
    _src: candle_core::Tensor,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Download({} ids)", self.n)
    }
}

/// Queues the copy of `ids` (u32) to the host.
pub fn start_download(ids: &candle_core::Tensor) -> Result<Download> {
    let ids = ids.contiguous()?;
    let n = ids.elem_count();
    let d = super::device_of(&ids)?;
    let stream = d.cuda_stream();
    let ctx = stream.context().clone();
    let err = |e| Error::Device(format!("cuda: cannot copy {n} ids to the host: {e}"));
    let reused = PINNED.with(|p| {
        let mut p = p.borrow_mut();
        let at = p.iter().position(|b| b.len() >= n)?;
        Some(p.swap_remove(at))
    });
    let mut host = match reused {
        Some(b) => b,
        None => {
            // Portable: page-locked for every context of the process.
            let flags = sys::CU_MEMHOSTALLOC_PORTABLE;
            // SAFETY: the buffer is written by a copy before it is read
            // (`Download::wait` waits for the copy's event first).
            unsafe { ctx.alloc_pinned_with_flags::<u32>(n.max(1024), flags) }.map_err(err)?
        }
    };
    if n > 0 {
        let src = super::ptr::<u32>(&ids)?;
        let dst = host.as_mut_ptr().map_err(err)?;
        // SAFETY: `src` is the address of `n` live u32 on this stream's
        // device (the tensor stays in the Download until the copy has run),
        // `dst` is page-locked host memory of at least `n` u32 that nothing
        // else uses until the Download is dropped, which first waits for
        // the copy's event; the copy is queued on the stream that writes
        // `src`, after that work.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst.cast(), src, n * 4, stream.cu_stream()) }
            .result()
            .map_err(err)?;
    }
    let flags = sys::CUevent_flags::CU_EVENT_DEFAULT;
    let done = match stream.record_event(Some(flags)) {
        Ok(e) => e,
        Err(e) => {
            // The copy may be queued: wait for the stream before the buffer
            // is freed with this error.
            let _ = stream.synchronize();
            return Err(err(e));
        }
    };
    Ok(Download {
        host: Some(host),
        done,
        n,
        _src: ids,
    })
}

impl Download {
    /// The ids, once the copy has run.
    pub fn wait(self) -> Result<Vec<u32>> {
        let n = self.n;
        let err = |e| Error::Device(format!("cuda: waiting for {n} ids failed: {e}"));
        self.done.synchronize().map_err(err)?;
        let host = self.host.as_ref().expect("a download holds its buffer");
        Ok(host.as_slice().map_err(err)?[..n].to_vec())
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        // The copy may still be running into the buffer: wait before it is
        // reused or freed.
        if self.done.synchronize().is_ok() {
            if let Some(b) = self.host.take() {
                PINNED.with(|p| p.borrow_mut().push(b));
            }
        }
    }
}
