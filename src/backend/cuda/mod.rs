//! CUDA glue: our kernels (kernels/*.cu, compiled by build.rs to SASS and
//! PTX and embedded: `module`) launched on candle's stream, over candle
//! tensors. The only
//! module with `unsafe`; every block says why it holds.

mod attention;
mod attention_wg;
mod device;
mod fill;
mod gptq;
mod graph;
mod kernels_attention;
mod kernels_cache;
mod lt;
mod lt_invariant;
mod lt_tune;
mod module;
mod sample;

pub use attention::{CudaKv, GpuBatch};
pub use attention_wg::{flash_prefill_wg, wg_prefill_selftest, WgPrefill};
pub use device::{
    device_count, mem_info, memory_usage, profiler, record_event, reset_memory_peak,
    single_stream_device, start_download, Download, Event,
};
pub use fill::fill_f16;
pub(crate) use fill::{fill_sz, fill_u32};
pub use graph::{capture, Graph};
pub use kernels_attention::{
    flash_prefill, paged_decode, paged_decode_into, paged_decode_with, prefill_tile_keys,
    prefill_tiles, DecodeIo, DecodeShape, DecodeVariant, PrefillChunk, PrefillShape, SharedDecode,
    DECODE_PART, PREFILL_GROUPS, PREFILL_ROWS, WGMMA_PREFILL_MIN_KEYS,
};
pub use kernels_cache::{kv_write, kv_write_fp8, scatter_rows, CacheLayer};

pub use gptq::{GptqGpu, WgLaunch, STAGE_MAX_M};
pub use lt::{count_differing, LtAlgo, LtProduct, WeightLayout};
pub use lt_invariant::{invariant_plan, invariant_product};
pub use lt_tune::{set_cublas_tuning, tuned_product};
pub(crate) use module::{Module, ATTENTION, ATTENTION_WG, GPTQ, GPTQ_WG, OPS};
pub use sample::{draw_rows, penalize_rows, row_norms};

use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::op::BackpropOp;
use candle_core::{DType, Device, Shape, Storage, Tensor};
use half::f16;
use std::sync::OnceLock;

/// The CUDA device of a tensor.
pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::Model(format!(
            "a CUDA kernel was given a tensor on {other:?}"
        ))),
    }
}

/// The CUDA device behind a candle device.
pub(crate) fn cuda(dev: &Device) -> Result<CudaDevice> {
    match dev {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::Model(format!(
            "expected a CUDA device, got {other:?}"
        ))),
    }
}

/// A device's compute capability and multiprocessor count, asked once per
/// device ordinal (a host may mix GPU generations, e.g. a sweep over several
/// cards).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arch {
    /// Compute capability (major, minor); (0, 0) when the driver does not say.
    pub cc: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: usize,
}

pub(crate) fn arch(dev: &CudaDevice) -> Arch {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static ARCH: OnceLock<std::sync::Mutex<std::collections::HashMap<usize, Arch>>> =
        OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let mut known = ARCH
        .get_or_init(Default::default)
        .lock()
        .expect("device arch cache");
    *known.entry(ctx.ordinal()).or_insert_with(|| Arch {
        cc: ctx.compute_capability().unwrap_or((0, 0)),
        sms: ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize),
    })
}

/// Whether a device runs sm_90a code (compute capability 9.0 exactly: the
/// architecture-specific wgmma code runs on Hopper and nowhere else).
pub(crate) fn is_sm90a(dev: &CudaDevice) -> bool {
    arch(dev).cc == (9, 0)
}

/// Whether the Hopper-only (wgmma) kernels run on `dev`: a CUDA device of
/// compute capability 9.0 ([`is_sm90a`]).
pub fn wgmma_runs_on(dev: &Device) -> bool {
    matches!(dev, Device::Cuda(d) if is_sm90a(d))
}

/// A kernel argument, pushed with its exact C type.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device pointer.
    P(u64),
    /// `int`.
    I(i32),
    /// `float`.
    F(f32),
    /// `size_t` / `uint64_t`.
    U(u64),
}

/// Launches `name` of `module` with `args`.
pub(crate) fn launch(
    dev: &CudaDevice,
    module: &Module,
    name: &str,
    cfg: LaunchConfig,
    args: &[Arg],
) -> Result<()> {
    let func = module::function(dev, module, name, cfg.shared_mem_bytes)?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    for a in args {
        match a {
            Arg::P(v) | Arg::U(v) => b.arg(v),
            Arg::I(v) => b.arg(v),
            Arg::F(v) => b.arg(v),
        };
    }
    // SAFETY: every caller passes device pointers of live, contiguous
    // buffers whose sizes match the kernel's indexing for the given launch
    // shape, and scalars of the exact C types the kernel declares.
    unsafe { b.launch(cfg) }
        .map_err(|e| Error::Device(format!("cuda kernel {name} failed to launch: {e}")))?;
    Ok(())
}

/// Device address of a contiguous CUDA tensor's first element.
pub(crate) fn ptr<T: CudaDType>(t: &Tensor) -> Result<u64> {
    if !t.is_contiguous() {
        return Err(Error::Model(format!(
            "a CUDA kernel needs a contiguous tensor, got shape {:?} strides {:?}",
            t.dims(),
            t.stride()
        )));
    }
    addr::<T>(t)
}

/// A 2-D tensor whose rows are each contiguous (a column slice of a wider
/// one, e.g. q of a fused q/k/v output): the address of its first element
/// and the distance between rows, in elements.
pub(crate) fn rows_ptr<T: CudaDType>(t: &Tensor) -> Result<(u64, usize)> {
    let (rows, width) = t.dims2()?;
    let st = t.stride();
    if width > 1 && st[1] != 1 {
        return Err(Error::Model(format!(
            "a CUDA kernel needs rows of contiguous elements, got shape {:?} strides {st:?}",
            t.dims()
        )));
    }
    let stride = if rows > 1 { st[0] } else { width };
    Ok((addr::<T>(t)?, stride))
}

fn addr<T: CudaDType>(t: &Tensor) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else {
        return Err(Error::Model("a CUDA kernel was given a CPU tensor".into()));
    };
    let slice = T::as_cuda_slice(cs)?;
    let stream = cs.device.cuda_stream();
    let (p, _sync) = slice.device_ptr(&stream);
    Ok(p + (layout.start_offset() * std::mem::size_of::<T>()) as u64)
}

/// A fresh uninitialised tensor whose every element the next kernel writes.
pub(crate) fn empty<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    dev: &CudaDevice,
    shape: impl Into<Shape>,
) -> Result<Tensor> {
    let shape = shape.into();
    // SAFETY: the memory is uninitialised; callers launch a kernel that
    // writes every element before anything reads the tensor.
    let slice = unsafe { dev.alloc::<T>(shape.elem_count()) }?;
    Ok(Tensor::from_storage(
        Storage::Cuda(T::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// A zeroed tensor.
pub(crate) fn zeros(dev: &CudaDevice, dtype: DType, shape: impl Into<Shape>) -> Result<Tensor> {
    Ok(Tensor::zeros(shape, dtype, &Device::Cuda(dev.clone()))?)
}

fn grid(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(threads).max(1), 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 1 when the element-wise kernels may move eight halves per access: `n`
/// a multiple of 8 and every (non-null) address 16-byte aligned; else 0.
fn vec8(n: usize, addrs: &[u64]) -> i32 {
    i32::from(n.is_multiple_of(8) && addrs.iter().all(|a| a.is_multiple_of(16)))
}

fn check_f16(t: &Tensor, what: &str) -> Result<()> {
    if t.dtype() != DType::F16 {
        return Err(Error::Model(format!(
            "{what}: the CUDA kernels take f16, got {:?} (set model.dtype = \"float16\")",
            t.dtype()
        )));
    }
    Ok(())
}

/// RMSNorm in HF's order, optionally after a residual add:
/// returns (normed, x + add) (the second is x itself without `add`).
pub fn rmsnorm_add(
    x: &Tensor,
    add: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    rmsnorm_add_with(x, add, weight, eps, true)
}

/// [`rmsnorm_add`], with a thread per 8-half vector of the row where a
/// block holds the row so (`one_vector`, the engine's: H = 4,096 takes 512
/// threads, every load of a row in flight at once) or, as until e111a44,
/// 128 threads keeping up to 8 vectors each.
pub fn rmsnorm_add_with(
    x: &Tensor,
    add: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    one_vector: bool,
) -> Result<(Tensor, Tensor)> {
    check_f16(x, "rmsnorm")?;
    let dev = device_of(x)?;
    let (rows, h) = x.dims2()?;
    let x = x.contiguous()?;
    let out = empty::<f16>(&dev, (rows, h))?;
    let res = match add {
        Some(_) => empty::<f16>(&dev, (rows, h))?,
        None => x.clone(),
    };
    let add = add.map(|a| a.contiguous()).transpose()?;
    let (px, pw, po) = (ptr::<f16>(&x)?, ptr::<f16>(weight)?, ptr::<f16>(&out)?);
    let pa = add.as_ref().map(ptr::<f16>).transpose()?.unwrap_or(0);
    let pr = if add.is_some() { ptr::<f16>(&res)? } else { 0 };
    let (hh, e) = (h as i32, eps as f32);
    // The vector path keeps a row in registers: up to 8 vectors of 8
    // halves per thread of 128 (NORM_RV in kernels/ops.cu), or one per
    // thread of up to 1,024 (rmsnorm_add_r1).
    let one = one_vector && h <= 8 * 1024;
    let threads = if one { (h / 8).div_ceil(32) * 32 } else { 128 };
    let vec = vec8(h, &[px, pa, pw, po, pr]) & i32::from(h <= 8 * 8 * 128 || one);
    let (name, threads) = match (vec != 0, one) {
        (true, true) => ("rmsnorm_add_r1", threads as u32),
        (true, false) => ("rmsnorm_add", 128),
        (false, _) => ("rmsnorm_add", 256),
    };
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    use Arg::*;
    launch(
        &dev,
        &OPS,
        name,
        cfg,
        &[P(px), P(pa), P(pw), P(po), P(pr), I(hh), F(e), I(vec)],
    )?;
    Ok((out, res))
}

/// f16(silu(gate)) * up, elementwise, for gate and up [rows, width] whose
/// rows are contiguous (column slices of one fused output are read in
/// place); returns a dense [rows, width].
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    check_f16(gate, "silu_mul")?;
    let dev = device_of(gate)?;
    let (rows, width) = gate.dims2()?;
    let ((pg, gs), (pu, us)) = (rows_ptr::<f16>(gate)?, rows_ptr::<f16>(up)?);
    let out = empty::<f16>(&dev, (rows, width))?;
    let po = ptr::<f16>(&out)?;
    let vec = vec8(width, &[pg, pu, po]) & vec8(gs, &[]) & vec8(us, &[]);
    let threads = rows * if vec != 0 { width / 8 } else { width };
    let ints = [rows, width, gs, us].map(|x| Arg::I(x as i32));
    let mut args = vec![Arg::P(pg), Arg::P(pu), Arg::P(po)];
    args.extend(ints);
    args.push(Arg::I(vec));
    launch(&dev, &OPS, "silu_mul", grid(threads, 256), &args)?;
    Ok(out)
}

/// Reads every byte of the f16 tensor `t` once (a read-bandwidth ceiling
/// for benchmarks).
pub fn read_all(t: &Tensor) -> Result<()> {
    check_f16(t, "read_all")?;
    let dev = device_of(t)?;
    let bytes = t.elem_count() * 2;
    if !bytes.is_multiple_of(16) {
        return Err(Error::Model(format!(
            "read_all: {bytes} bytes is not a multiple of 16"
        )));
    }
    let sink = empty::<u32>(&dev, 1)?;
    let (p, ps) = (ptr::<f16>(t)?, ptr::<u32>(&sink)?);
    let cfg = LaunchConfig {
        grid_dim: (132 * 8, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    use Arg::*;
    launch(
        &dev,
        &OPS,
        "read_sum",
        cfg,
        &[P(p), U((bytes / 16) as u64), P(ps)],
    )
}

/// HF-order f16 RoPE of q [T, nq*D] and k [T, nk*D] (rows contiguous:
/// column slices of a fused q/k/v output are read in place) at `positions`
/// [T] (u32) with full cos/sin tables [P, D/2]; returns dense (q, k).
pub fn rope_qk(
    q: &Tensor,
    k: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    head_dim: usize,
) -> Result<(Tensor, Tensor)> {
    check_f16(q, "rope_qk")?;
    let dev = device_of(q)?;
    let (t, qw) = q.dims2()?;
    let kw = k.dim(1)?;
    let ((pq, qs), (pk, ks)) = (rows_ptr::<f16>(q)?, rows_ptr::<f16>(k)?);
    let qo = empty::<f16>(&dev, (t, qw))?;
    let ko = empty::<f16>(&dev, (t, kw))?;
    let (nq, nk) = (qw / head_dim, kw / head_dim);
    let p = [
        pq,
        pk,
        ptr::<f16>(cos)?,
        ptr::<f16>(sin)?,
        ptr::<u32>(positions)?,
        ptr::<f16>(&qo)?,
        ptr::<f16>(&ko)?,
    ];
    // (positions are read one u32 per token: their address does not count)
    let vec =
        vec8(head_dim / 2, &[p[0], p[1], p[2], p[3], p[5], p[6]]) & vec8(qs, &[]) & vec8(ks, &[]);
    let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
    args.extend([t, nq, nk, head_dim, qs, ks].map(|x| Arg::I(x as i32)));
    args.push(Arg::I(vec));
    let pairs = t * (nq + nk) * head_dim / 2;
    let threads = if vec != 0 { pairs / 8 } else { pairs };
    launch(&dev, &OPS, "rope_qk", grid(threads, 256), &args)?;
    Ok((qo, ko))
}

/// [`rope_qk`] with the cache write fused: q [T, nq*D], k and v [T,
/// nk*D] (rows contiguous; column slices of the fused q/k/v output are
/// read in place); the rotated k and the v rows go straight to the cache
/// tensors `kc`/`vc` at rows `slots` [T] (u32). Returns the rotated q
/// (dense), or `None` when the rows are not whole 16-byte vectors (the
/// caller then runs [`rope_qk`] and the separate cache write).
pub fn rope_qkv_cache(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    cos: &Tensor,
    sin: &Tensor,
    positions: &Tensor,
    head_dim: usize,
    (kc, vc): (&Tensor, &Tensor),
    slots: &Tensor,
) -> Result<Option<Tensor>> {
    check_f16(q, "rope_qkv_cache")?;
    let dev = device_of(q)?;
    let (t, qw) = q.dims2()?;
    let kw = k.dim(1)?;
    let ((pq, qs), (pk, ks), (pv, vs)) = (
        rows_ptr::<f16>(q)?,
        rows_ptr::<f16>(k)?,
        rows_ptr::<f16>(v)?,
    );
    let qo = empty::<f16>(&dev, (t, qw))?;
    let p = [
        pq,
        pk,
        pv,
        ptr::<f16>(cos)?,
        ptr::<f16>(sin)?,
        ptr::<u32>(positions)?,
        ptr::<u32>(slots)?,
        ptr::<f16>(&qo)?,
        ptr::<f16>(kc)?,
        ptr::<f16>(vc)?,
    ];
    let aligned = [p[0], p[1], p[2], p[3], p[4], p[7], p[8], p[9]];
    let vec = vec8(head_dim / 2, &aligned) & vec8(qs, &[]) & vec8(ks, &[]) & vec8(vs, &[]);
    if vec == 0 || v.dim(1)? != kw {
        return Ok(None);
    }
    let (nq, nk) = (qw / head_dim, kw / head_dim);
    let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
    args.extend([t, nq, nk, head_dim, qs, ks, vs].map(|x| Arg::I(x as i32)));
    let threads = t * (nq + 2 * nk) * head_dim / 16;
    launch(&dev, &OPS, "rope_qkv_cache", grid(threads, 256), &args)?;
    Ok(Some(qo))
}

/// Most candidates the GPU top-k selection returns per row.
pub const TOPK_MAX: usize = 1024;

/// Per row of f32 logits [R, V]: the `k` best `(token, logit / t)` in the
/// host sampler's order (value descending, ties by lower id), non-finite
/// logits skipped; rows with fewer finite values get shorter lists.
pub fn topk_rows(logits: &Tensor, temps: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let dev = device_of(logits)?;
    let logits = logits.contiguous()?;
    let (r, v) = logits.dims2()?;
    if !(1..=TOPK_MAX).contains(&k) || temps.len() != r {
        return Err(Error::Model(format!(
            "topk_rows: k is {k} (1..={TOPK_MAX}) for {r} rows and {} temperatures",
            temps.len()
        )));
    }
    let t = Tensor::from_vec(temps.to_vec(), r, logits.device())?;
    let ids = empty::<u32>(&dev, (r, k))?;
    let vals = empty::<f32>(&dev, (r, k))?;
    let args = [
        Arg::P(ptr::<f32>(&logits)?),
        Arg::P(ptr::<f32>(&t)?),
        Arg::P(ptr::<u32>(&ids)?),
        Arg::P(ptr::<f32>(&vals)?),
        Arg::I(v as i32),
        Arg::I(k as i32),
    ];
    let cfg = LaunchConfig {
        grid_dim: (r as u32, 1, 1),
        block_dim: (1024, 1, 1),
        shared_mem_bytes: 0,
    };
    launch(&dev, &OPS, "topk_rows", cfg, &args)?;
    let ids = ids.to_vec2::<u32>()?;
    let vals = vals.to_vec2::<f32>()?;
    Ok(ids
        .into_iter()
        .zip(vals)
        .map(|(i, v)| {
            i.into_iter()
                .zip(v)
                .take_while(|(id, _)| *id != u32::MAX)
                .collect()
        })
        .collect())
}

/// Device seconds per call of `f`, from a CUDA graph of `iters` calls
/// captured on the device's stream and replayed (5 replays, median): the
/// kernels' own time without the host's launch cost. `None` when the calls
/// cannot be captured (the wall-clock figure is then the only one).
pub fn graph_time(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Option<f64>> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = cuda(dev)?.cuda_stream();
    f()?; // loads modules, grows workspaces: nothing to do while capturing
    dev.synchronize()?;
    if let Err(e) = stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
        tracing::warn!("cuda graph capture failed to start: {e}");
        return Ok(None);
    }
    let ran = (0..iters).try_for_each(|_| f());
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    let graph = match (ran, graph) {
        (Ok(()), Ok(Some(graph))) => graph,
        (ran, graph) => {
            tracing::warn!(
                "cuda graph capture failed: {:?} / {:?}",
                ran.err(),
                graph.err()
            );
            dev.synchronize()?;
            return Ok(None);
        }
    };
    let replay = || -> Result<()> {
        graph
            .launch()
            .map_err(|e| Error::Device(format!("cuda graph launch failed: {e}")))
    };
    replay()?;
    dev.synchronize()?;
    let mut v = Vec::new();
    for _ in 0..5 {
        let t = std::time::Instant::now();
        replay()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / iters as f64);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(Some(v[2]))
}
