//! Launch wrappers of `kernels/attention.cu`'s cache side: the f16 and FP8
//! cache writes, the row scatter of block copies, and [`CacheLayer`], the
//! cache as the attention kernels read it.

use super::{check_f16, device_of, grid, launch, ptr, rows_ptr, Arg, ATTENTION};
use crate::{Error, Result};
use candle_core::Tensor;
use half::f16;

/// Writes k/v rows [n, row] into the cache tensors [slots, row] at `slots`;
/// k and v need only contiguous rows (v may be a column slice of a fused
/// q/k/v output, read in place).
pub fn kv_write(k: &Tensor, v: &Tensor, kc: &Tensor, vc: &Tensor, slots: &Tensor) -> Result<()> {
    check_f16(k, "kv_write")?;
    let dev = device_of(k)?;
    let (n, row) = k.dims2()?;
    let ((pk, ks), (pv, vs)) = (rows_ptr::<f16>(k)?, rows_ptr::<f16>(v)?);
    let whole = [row, ks, vs].iter().all(|x| x.is_multiple_of(8))
        && [pk, pv].iter().all(|a| a.is_multiple_of(16));
    if !whole {
        return Err(Error::Model(format!(
            "kv_write: rows of {row} halves, {ks} and {vs} apart, are not whole 16-byte vectors"
        )));
    }
    let p = [pk, pv, ptr::<f16>(kc)?, ptr::<f16>(vc)?, ptr::<u32>(slots)?];
    let mut args: Vec<Arg> = p.iter().map(|&x| Arg::P(x)).collect();
    args.extend([n, row, ks, vs].map(|x| Arg::I(x as i32)));
    launch(&dev, &ATTENTION, "kv_write", grid(n * row / 8, 256), &args)?;
    Ok(())
}

/// One layer's cache as the attention kernels read it: K and V rows
/// `[slots, kv_heads * head_dim]` of f16, or of FP8 E4M3 codes (u8) with
/// their f32 scales `[slots, kv_heads]` (one per token and KV head).
#[derive(Debug, Clone, Copy)]
pub struct CacheLayer<'a> {
    /// Keys.
    pub k: &'a Tensor,
    /// Values.
    pub v: &'a Tensor,
    /// FP8: the keys' and the values' scales.
    pub scales: Option<(&'a Tensor, &'a Tensor)>,
    /// FP8: decode through the direct builds (`paged_decode_*f8d_*`: the
    /// codes converted into the mma fragments as they are, the scales
    /// applied to the scores and to P; not bit-identical to the widening
    /// builds; the engine's, `CudaKv::attend`). Flash prefill always widens.
    pub direct: bool,
    /// f16, head dim 128: decode through the swizzled builds
    /// (`paged_decode_sw_*`: unpadded stage rows, bit-identical to the
    /// padded ones; the engine's f16 decode at head dim 128 since run 89).
    pub swizzled: bool,
}

impl<'a> CacheLayer<'a> {
    /// An f16 cache.
    pub fn f16(k: &'a Tensor, v: &'a Tensor) -> Self {
        Self {
            k,
            v,
            scales: None,
            direct: false,
            swizzled: false,
        }
    }

    /// An FP8 cache: codes `k`/`v` and their scales `ks`/`vs`.
    pub fn fp8(k: &'a Tensor, v: &'a Tensor, ks: &'a Tensor, vs: &'a Tensor) -> Self {
        Self {
            k,
            v,
            scales: Some((ks, vs)),
            direct: false,
            swizzled: false,
        }
    }

    /// The same cache, decoded through the direct FP8 builds.
    pub fn direct(self) -> Self {
        Self {
            direct: true,
            ..self
        }
    }

    /// How the engine decodes this cache at `head_dim`: FP8 through the
    /// direct builds (codes straight into the mma fragments; run 48: 19-22%
    /// faster than widening), f16 at head dim 128 through the swizzled ones
    /// (the same bits as the padded; run 88: 4-9% faster), else as it is.
    pub fn engine_decode(self, head_dim: usize) -> Self {
        match (self.scales.is_some(), head_dim) {
            (true, _) => self.direct(),
            (false, 128) => self.swizzled(),
            _ => self,
        }
    }

    /// The same f16 cache, decoded through the swizzled builds.
    pub fn swizzled(self) -> Self {
        Self {
            swizzled: self.scales.is_none(),
            ..self
        }
    }

    /// The kernels' pointer arguments: k, v, k scales, v scales (0 for f16).
    pub(super) fn ptrs(&self) -> Result<[u64; 4]> {
        Ok(match self.scales {
            None => [ptr::<f16>(self.k)?, ptr::<f16>(self.v)?, 0, 0],
            Some((ks, vs)) => [
                ptr::<u8>(self.k)?,
                ptr::<u8>(self.v)?,
                ptr::<f32>(ks)?,
                ptr::<f32>(vs)?,
            ],
        })
    }

    /// The kernel name's tag of the cache's element type.
    pub(super) fn tag(&self) -> &'static str {
        if self.scales.is_some() {
            "f8_"
        } else {
            ""
        }
    }

    /// The decode kernels' tag: [`Self::tag`], `f8d_` for the direct
    /// builds, `sw_` for the swizzled ones.
    pub(super) fn decode_tag(&self) -> &'static str {
        match (self.scales, self.direct, self.swizzled) {
            (Some(_), true, _) => "f8d_",
            (None, _, true) => "sw_",
            _ => self.tag(),
        }
    }
}

/// The FP8 cache write: k/v rows [n, kv_heads * head_dim] (f16, rows
/// contiguous; v may be a column slice) quantized into `cache` at rows
/// `slots` [n] (u32), one scale per row of each KV head (`amax / 448`:
/// `crate::quant::fp8`'s arithmetic, bit for bit).
pub fn kv_write_fp8(
    k: &Tensor,
    v: &Tensor,
    cache: CacheLayer<'_>,
    head_dim: usize,
    slots: &Tensor,
) -> Result<()> {
    check_f16(k, "kv_write_fp8")?;
    check_f16(v, "kv_write_fp8")?;
    let dev = device_of(k)?;
    let (n, row) = k.dims2()?;
    if cache.scales.is_none() || v.dims2()? != (n, row) || !row.is_multiple_of(head_dim) {
        return Err(Error::Model(format!(
            "kv_write_fp8: k {:?} and v {:?} must both be [n, kv_heads * {head_dim}] and the cache fp8",
            k.dims(),
            v.dims()
        )));
    }
    let ((pk, ks), (pv, vs)) = (rows_ptr::<f16>(k)?, rows_ptr::<f16>(v)?);
    let [kc, vc, ksc, vsc] = cache.ptrs()?;
    let mut args: Vec<Arg> = [pk, pv, kc, vc, ksc, vsc, ptr::<u32>(slots)?]
        .iter()
        .map(|&x| Arg::P(x))
        .collect();
    let nk = row / head_dim;
    args.extend([n, nk, head_dim, ks, vs].map(|x| Arg::I(x as i32)));
    // One warp per (row, kv head, K or V).
    launch(
        &dev,
        &ATTENTION,
        "kv_write_fp8",
        grid(n * nk * 2 * 32, 256),
        &args,
    )
}

/// Copies the rows of `src` [n, w] (dense, 4-byte elements or a row of a
/// multiple of 4 bytes) to rows `to` [n] (u32) of `dst` [rows, w].
pub fn scatter_rows(src: &Tensor, dst: &Tensor, to: &Tensor) -> Result<()> {
    let dev = device_of(src)?;
    let (n, w) = src.dims2()?;
    let bytes = w * src.dtype().size_in_bytes();
    if dst.dtype() != src.dtype() || dst.dim(1)? != w || !bytes.is_multiple_of(4) {
        return Err(Error::Model(format!(
            "scatter_rows: rows of {bytes} bytes ({:?} into {:?}) must match and be whole 32-bit words",
            src.dims(),
            dst.dims()
        )));
    }
    let (ps, pd) = match src.dtype() {
        candle_core::DType::U8 => (ptr::<u8>(src)?, ptr::<u8>(dst)?),
        candle_core::DType::F32 => (ptr::<f32>(src)?, ptr::<f32>(dst)?),
        candle_core::DType::F16 => (ptr::<f16>(src)?, ptr::<f16>(dst)?),
        other => {
            return Err(Error::Model(format!(
                "scatter_rows: {other:?} rows are not supported"
            )))
        }
    };
    let words = bytes / 4;
    use Arg::*;
    let args = [
        P(ps),
        P(pd),
        P(ptr::<u32>(to)?),
        I(n as i32),
        I(words as i32),
    ];
    launch(
        &dev,
        &ATTENTION,
        "scatter_rows_b32",
        grid(n * words, 256),
        &args,
    )
}
