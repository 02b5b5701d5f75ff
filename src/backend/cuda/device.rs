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

impl Event {
    /// Device milliseconds from this event to `end` (waits for both).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f64> {
        self.0
            .elapsed_ms(&end.0)
            .map(f64::from)
            .map_err(|e| Error::Device(format!("cuda: event timing failed: {e}")))
    }
}
