//! Where the model runs and how large its KV cache is: `engine.device =
//! "auto"` picks the first GPU when it can, and with no explicit
//! `num_blocks` / `kv_cache_mib` the cache takes what the device has left
//! (GPU: within `gpu_memory_utilization` after the weights and a profiling
//! forward; CPU: a quarter of the available RAM).

use crate::config::{DType, Device, JobSpec};
use crate::model::Mistral;
use crate::{Error, Result};

/// Share of the available RAM the CPU's automatic cache takes.
pub const CPU_CACHE_FRACTION: f64 = 0.25;

/// The candle device for a configured one (`auto` resolved and logged).
pub fn candle_device(d: Device, dtype: DType) -> Result<candle_core::Device> {
    match d {
        Device::Cpu => Ok(candle_core::Device::Cpu),
        Device::Cuda(n) => cuda_device(n),
        Device::Auto if dtype != DType::F16 => {
            tracing::info!(
                ?dtype,
                "engine.device = auto: the CPU (the CUDA path runs f16)"
            );
            Ok(candle_core::Device::Cpu)
        }
        Device::Auto => match cuda_device(0) {
            Ok(dev) => {
                tracing::info!("engine.device = auto: cuda:0");
                Ok(dev)
            }
            Err(e) => {
                tracing::info!("engine.device = auto: the CPU ({e})");
                Ok(candle_core::Device::Cpu)
            }
        },
    }
}

/// Every visible CUDA device (`sweep.devices = ["auto"]`).
pub fn visible_gpus() -> Result<Vec<Device>> {
    let n = crate::cuda::device_count().map_err(|e| {
        Error::Config(format!(
            "every visible GPU was asked for (engine.devices = \"all\" or sweep.devices = [\"auto\"]) but they cannot be counted ({e})"
        ))
    })?;
    tracing::info!(gpus = n, "visible GPUs");
    Ok((0..n).map(Device::Cuda).collect())
}

fn cuda_device(n: usize) -> Result<candle_core::Device> {
    crate::cuda::single_stream_device(n).map_err(|e| {
        Error::Config(format!(
            "engine.device is cuda:{n} but it cannot be used ({e})"
        ))
    })
}

/// KV blocks of the job's cache: `engine.num_blocks`; else what
/// `max_num_seqs` full-context (up to 8,192) sequences need, within
/// `kv_cache_mib` when set, else within what the device has left.
pub fn cache_blocks(model: &Mistral, spec: &JobSpec) -> Result<usize> {
    let e = &spec.engine;
    let per_block = model.kv_bytes_per_block(e.block_size);
    let (num_blocks, budget_from) = match (e.num_blocks, e.kv_cache_mib) {
        (0, 0) => {
            let bytes = free_for_cache(model, spec)?;
            (bytes / per_block, "free memory")
        }
        (0, mib) => {
            let want = wanted_blocks(model, spec);
            (
                want.min(mib * 1024 * 1024 / per_block),
                "engine.kv_cache_mib",
            )
        }
        (n, _) => (n, "engine.num_blocks"),
    };
    if num_blocks == 0 {
        return Err(Error::Config(format!(
            "the KV cache gets no block ({budget_from}); lower the weights' footprint or set engine.kv_cache_mib"
        )));
    }
    tracing::info!(
        num_blocks,
        block_size = e.block_size,
        tokens = num_blocks * e.block_size,
        gib = format!(
            "{:.1}",
            (num_blocks * per_block) as f64 / (1u64 << 30) as f64
        ),
        sized_by = budget_from,
        "kv cache"
    );
    Ok(num_blocks)
}

/// Bytes the automatic cache may take on the model's device.
fn free_for_cache(model: &Mistral, spec: &JobSpec) -> Result<usize> {
    if model.device().is_cuda() {
        return gpu_free_for_cache(model, spec);
    }
    let avail = available_ram()?;
    let bytes = (avail as f64 * CPU_CACHE_FRACTION) as usize;
    // On the CPU more than max_num_seqs full sequences would only hold RAM.
    let per_block = model.kv_bytes_per_block(spec.engine.block_size);
    Ok(bytes.min(wanted_blocks(model, spec) * per_block))
}

/// Blocks that `max_num_seqs` sequences of the full context (up to 8,192
/// tokens) take.
fn wanted_blocks(model: &Mistral, spec: &JobSpec) -> usize {
    let e = &spec.engine;
    let ctx = model.config().max_position_embeddings.min(8192);
    e.max_num_seqs * ctx.div_ceil(e.block_size)
}

/// `MemAvailable` of /proc/meminfo in bytes.
fn available_ram() -> Result<usize> {
    let info =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| Error::io("/proc/meminfo", e))?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| {
            Error::Config(
                "cannot read MemAvailable from /proc/meminfo; set engine.kv_cache_mib".into(),
            )
        })
}

fn gpu_free_for_cache(model: &Mistral, spec: &JobSpec) -> Result<usize> {
    let dev = model.device();
    let act = profile_forward(model, spec)?;
    let (weights, _) = crate::cuda::memory_usage(dev)?;
    let (free, total) = crate::cuda::mem_info()?;
    let util = spec.engine.gpu_memory_utilization;
    // Everything in use now (weights, the CUDA context, other processes)
    // plus the activation peak stays out of the cache.
    let used = total - free;
    let limit = (total as f64 * util) as usize;
    let bytes = limit
        .saturating_sub(used + act)
        .min(free.saturating_sub(act));
    tracing::info!(
        weights_gib = gib(weights as usize),
        activation_peak_gib = gib(act),
        device_used_gib = gib(used),
        device_total_gib = gib(total),
        gpu_memory_utilization = util,
        cache_gib = gib(bytes),
        "gpu memory"
    );
    Ok(bytes)
}

fn gib(b: usize) -> String {
    format!("{:.2}", b as f64 / (1u64 << 30) as f64)
}

/// The activation peak of one forward at the job's limits: a prefill chunk
/// of `max_batch_tokens - (max_num_seqs - 1)` tokens beside `max_num_seqs -
/// 1` single tokens, every sequence taking a logits row. Returns the bytes
/// above what the weights and the forward's own scratch cache hold.
fn profile_forward(model: &Mistral, spec: &JobSpec) -> Result<usize> {
    use crate::model::{LogitRows, SeqChunk};
    let e = &spec.engine;
    let ctx = model.config().max_position_embeddings;
    let seqs = e.max_num_seqs.min(e.max_batch_tokens).max(1);
    let long = (e.max_batch_tokens - (seqs - 1)).min(ctx);
    let lens: Vec<usize> = std::iter::once(long)
        .chain(std::iter::repeat_n(1, seqs - 1))
        .collect();
    let tables = super::fresh_tables(&lens, e.block_size);
    let mut cache = model.new_cache(tables.iter().map(Vec::len).sum(), e.block_size)?;
    let tokens: Vec<Vec<u32>> = lens.iter().map(|&l| vec![1u32; l]).collect();
    let chunks: Vec<SeqChunk<'_>> = tokens
        .iter()
        .zip(&tables)
        .map(|(t, b)| SeqChunk {
            tokens: t,
            start_pos: 0,
            blocks: b,
        })
        .collect();
    let dev = model.device();
    crate::cuda::reset_memory_peak(dev)?;
    let (before, _) = crate::cuda::memory_usage(dev)?;
    let logits = model.forward(&chunks, &mut cache, LogitRows::LastOfEachChunk)?;
    dev.synchronize()?;
    let (_, high) = crate::cuda::memory_usage(dev)?;
    drop((logits, cache));
    crate::cuda::reset_memory_peak(dev)?;
    Ok(high.saturating_sub(before) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` never fails: a GPU when this build and machine have one (f16
    /// only), else the CPU.
    #[test]
    fn auto_falls_back_to_the_cpu() {
        let d = candle_device(Device::Auto, DType::F32).unwrap();
        assert!(d.is_cpu(), "the CUDA path runs f16 only");
        let d = candle_device(Device::Auto, DType::F16).unwrap();
        assert_eq!(
            d.is_cuda(),
            crate::cuda::device_count().is_ok_and(|n| n > 0)
        );
    }

    #[test]
    fn available_ram_is_read() {
        assert!(available_ram().unwrap() > 0);
    }
}
