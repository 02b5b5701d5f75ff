//! `runner bench`: workloads W1-W4 on dummy weights and, on CUDA, the
//! kernel benches; prints a table and optionally writes JSON.

use crate::bench::{self, WORKLOADS};
use crate::config::JobSpec;
#[cfg(feature = "cuda")]
use crate::report::fmt_opt;
use std::path::Path;

/// What `runner bench` was asked to do.
pub struct BenchArgs<'a> {
    /// Workload names (W1..W4), empty for none.
    pub workloads: &'a [String],
    /// Fraction of each workload's prompts to run (quick checks).
    pub scale: f64,
    /// Directory with tokenizer.json.
    pub tokenizer: &'a Path,
    /// Also run the kernel benches (CUDA).
    pub kernels: bool,
    /// With `kernels`: the GPTQ products only.
    pub gemm_only: bool,
    /// With `kernels`: the GPTQ products' token counts (empty: the default).
    pub gemm_m: &'a [usize],
    /// With `kernels`: the GPTQ products' shapes by name (empty: all).
    pub gemm_shapes: &'a [String],
    /// Token counts of the cuBLASLt algorithm table (empty: none).
    pub gemm_lt: &'a [usize],
    /// Time the workloads' kernel classes.
    pub breakdown: bool,
    /// Write the results here as JSON.
    pub json: Option<&'a Path>,
}

/// Runs the benches of `args` with the engine settings of `spec`.
pub fn bench(spec: &JobSpec, args: &BenchArgs<'_>) -> anyhow::Result<()> {
    let mut report = serde_json::Map::new();
    report.insert(
        "commit".into(),
        std::env::var("BENCH_COMMIT")
            .ok()
            .or(option_env!("RUNNER_GIT_COMMIT").map(str::to_string))
            .unwrap_or_else(|| "unknown".into())
            .into(),
    );
    #[cfg(not(feature = "cuda"))]
    if args.kernels
        || args.gemm_only
        || !args.gemm_m.is_empty()
        || !args.gemm_shapes.is_empty()
        || !args.gemm_lt.is_empty()
    {
        anyhow::bail!("--kernels and --gemm-lt need a binary built with the `cuda` feature");
    }
    #[cfg(feature = "cuda")]
    let matmul = cuda_benches(spec, args, &mut report)?;
    #[cfg(not(feature = "cuda"))]
    let matmul = 0.0;
    if !args.workloads.is_empty() {
        workloads(spec, args, matmul, &mut report)?;
    }
    if let Some(p) = args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// The JSON report of one `runner bench`.
type Report = serde_json::Map<String, serde_json::Value>;

/// On a CUDA device: the ceilings (cuBLAS's 8192^3 rate, returned, and the
/// copy bandwidth), then the kernel tables `--kernels` asks for.
#[cfg(feature = "cuda")]
fn cuda_benches(spec: &JobSpec, args: &BenchArgs<'_>, report: &mut Report) -> anyhow::Result<f64> {
    let dev = crate::engine::candle_device(spec.engine.device, spec.model.dtype)?;
    if !dev.is_cuda() {
        return Ok(0.0);
    }
    let matmul = bench::kernels::matmul_tflops(&dev)?;
    let copy = bench::kernels::copy_gbs(&dev)?;
    println!("ceilings: cuBLAS f16 8192^3 {matmul:.0} TFLOP/s, d2d copy {copy:.0} GB/s");
    report.insert("matmul_tflops".into(), matmul.into());
    report.insert("copy_gbs".into(), copy.into());
    if args.kernels {
        gemm_tables(&dev, spec, args, report)?;
        if !args.gemm_only {
            attention_tables(&dev, report)?;
            prefill_tables(&dev, matmul, report)?;
            head_table(&dev, report)?;
            ops_table(&dev, report)?;
        }
    }
    if !args.gemm_lt.is_empty() {
        lt_table(&dev, args.gemm_lt, report)?;
    }
    Ok(matmul)
}

/// cuBLAS's own choice against every algorithm cuBLASLt offers.
#[cfg(feature = "cuda")]
fn lt_table(dev: &candle_core::Device, ms: &[usize], report: &mut Report) -> anyhow::Result<()> {
    let rows = bench::lt::lt_table(dev, ms, 32)?;
    println!(
        "cuBLASLt algorithms (f16, f32 compute; device µs): shape, M, cuBLAS's choice (candle matmul), the heuristic's first, the fastest (config id/tile/stages/splits/reduction/cluster, = where its values equal matmul's), the fastest with matmul's values, algorithms offered / with matmul's values, the batch-invariant product (`fused`)"
    );
    let f = |x| fmt_opt(x, 1);
    for r in &rows {
        let first = r.algos.first();
        let best = r.best(false);
        let same = r.best(true);
        println!(
            "  {:<8} {:>5}  {:>8}  {:>8}  {:>8} {:<20}{}  {:>8}  {:>2}/{:<2}  {:>8}",
            r.shape,
            r.m,
            f(r.cublas_us),
            f(first.and_then(|a| a.us)),
            f(best.and_then(|a| a.us)),
            best.map_or(String::new(), |a| a.config.clone()),
            if best.is_some_and(|a| a.same_values) {
                "="
            } else {
                " "
            },
            f(same.and_then(|a| a.us)),
            r.algos.len(),
            r.algos.iter().filter(|a| a.same_values).count(),
            f(r.invariant_us)
        );
    }
    report.insert("gemm_lt".into(), serde_json::to_value(&rows)?);
    let inv = bench::lt::lt_invariance(dev, ms)?;
    println!(
        "split-free cuBLASLt products, rows 0-7 against the smallest M's (= same values, x differ, - no split-free algorithm offered):"
    );
    for r in &inv {
        let cells: Vec<String> =
            r.at.iter()
                .map(|(m, _, same)| {
                    let mark = match same {
                        Some(true) => "=",
                        Some(false) => "x",
                        None => "-",
                    };
                    format!("{m}{mark}")
                })
                .collect();
        println!("  {:<8} {}", r.shape, cells.join(" "));
    }
    report.insert("gemm_lt_invariance".into(), serde_json::to_value(&inv)?);
    Ok(())
}

/// The GPTQ products of `model.dummy_quant` against cuBLAS f16.
#[cfg(feature = "cuda")]
fn gemm_tables(
    dev: &candle_core::Device,
    spec: &JobSpec,
    args: &BenchArgs<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let name = spec.model.dummy_quant.as_deref().unwrap_or("4bit-128g");
    let q = crate::model::QuantConfig::from_short_name(name)?.ok_or_else(|| {
        anyhow::anyhow!(
            "--kernels benches GPTQ products: model.dummy_quant is `{name}`, expected a quantization such as 4bit-128g or 8bit--1g"
        )
    })?;
    // Issue 16's breakpoints: 1-16, 32, 64, 128-256, 1024, 4096.
    let ms: &[usize] = if args.gemm_m.is_empty() {
        &[1, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
    } else {
        args.gemm_m
    };
    let rows = bench::kernels::gemm_table(dev, q.bits, q.group_size, ms, args.gemm_shapes)?;
    print_gemm(&q.short_name(), &rows);
    report.insert("gemm".into(), serde_json::to_value(&rows)?);
    Ok(())
}

/// The LM head at the decode batch sizes of W2/W3, W1 and beyond.
#[cfg(feature = "cuda")]
fn head_table(dev: &candle_core::Device, report: &mut Report) -> anyhow::Result<()> {
    let rows = bench::kernels::head_table(dev, &[64, 128, 256, 508, 1024])?;
    println!(
        "lm head (4096 -> 32000, f16, cuBLAS; device µs): M, through the transposed view as `Linear` runs it (TFLOP/s), over a contiguous copy, the view then f32 logits"
    );
    let f = |x| fmt_opt(x, 1);
    for r in &rows {
        println!(
            "  {:>5}  {:>8} ({:>4})  {:>8}  {:>8}",
            r.m,
            f(r.view_us),
            fmt_opt(r.view_tflops, 0),
            f(r.contiguous_us),
            f(r.with_f32_us)
        );
    }
    report.insert("lm_head".into(), serde_json::to_value(&rows)?);
    Ok(())
}

/// The element-wise kernels at W3's and W1's decode batches and a mixed
/// step's tokens.
#[cfg(feature = "cuda")]
fn ops_table(dev: &candle_core::Device, report: &mut Report) -> anyhow::Result<()> {
    let rows = bench::kernels::ops_table(dev, &[119, 508, 8049])?;
    println!(
        "element-wise (H 4096, FFN 14336; device µs, GB/s): M, RMSNorm + residual add by 128 threads of up to 8 vectors, by a thread per vector (the engine's), SiLU-mul"
    );
    let (f, g) = (|x| fmt_opt(x, 1), |x| fmt_opt(x, 0));
    for r in &rows {
        println!(
            "  {:>5}  {:>7} {:>5}  {:>7} {:>5}  {:>7} {:>5}",
            r.m,
            f(r.norm_us[0]),
            g(r.norm_gbs[0]),
            f(r.norm_us[1]),
            g(r.norm_gbs[1]),
            f(r.silu_us),
            g(r.silu_gbs)
        );
    }
    report.insert("ops".into(), serde_json::to_value(&rows)?);
    Ok(())
}

/// The GEMM table of `runner bench --kernels` for the quantization `name`.
#[cfg(feature = "cuda")]
fn print_gemm(name: &str, rows: &[bench::kernels::GemmRow]) {
    println!(
        "GEMM {} (wall TFLOP/s; device µs per call from CUDA graphs):",
        name
    );
    println!(
        "{:<10} {:>5} {:>7} {:>7} {:>7} {:>6} | {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>8} {:>6} {:>12}",
        "shape",
        "M",
        "fused",
        "deq+cub",
        "cuBLAS",
        "f/cub",
        "fused us",
        "best us",
        "(c,d)",
        "cuBLAS",
        "cub/f",
        "GB/s",
        "tiled us",
        "cub/t",
        "wg us",
        "cub/wg",
        "wg (bm,nw,s) us"
    );
    let opt = |v| fmt_opt(v, 1);
    for r in rows {
        // cuBLAS's device time over a product's.
        let vs_cublas = |us: Option<f64>| {
            us.zip(r.cublas_dev_us)
                .map_or("-".into(), |(t, c)| format!("{:.2}x", c / t))
        };
        let best = r
            .variants
            .iter()
            .filter_map(|&(c, st, t)| t.map(|t| (t, c, st)))
            .min_by(|a, b| a.0.total_cmp(&b.0));
        println!(
            "{:<10} {:>5} {:>7.1} {:>7.1} {:>7.1} {:>5.2}x | {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>8} {:>6} {}",
            r.shape,
            r.m,
            r.fused,
            r.dequant,
            r.cublas,
            r.fused / r.cublas,
            opt(r.fused_dev_us),
            opt(best.map(|b| b.0)),
            best.map_or("-".into(), |b| format!("(c{},s{})", b.1, b.2)),
            opt(r.cublas_dev_us),
            r.dev_speedup.map_or("-".into(), |v| format!("{v:.2}x")),
            r.fused_dev_gbs.map_or("-".into(), |v| format!("{v:.0}")),
            opt(r.tiled_dev_us),
            vs_cublas(r.tiled_dev_us),
            opt(r.wg_dev_us),
            vs_cublas(r.wg_dev_us),
            r.wg_variants
                .iter()
                .map(|(l, t)| {
                    format!("({},{},{}) {}", l.bm, l.nw, l.splits, opt(*t))
                })
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
}

/// Decode attention, plain and over a shared prefix.
#[cfg(feature = "cuda")]
fn attention_tables(dev: &candle_core::Device, report: &mut Report) -> anyhow::Result<()> {
    let att = bench::attention::attention_table(
        dev,
        &[
            (64, 512),
            (256, 1024),
            (256, 2048),
            (512, 192),
            (256, 192),
            (128, 192),
            (64, 8192),
        ],
    )?;
    let shared = bench::attention::shared_decode_table(
        dev,
        &[
            (256, 1024, 64),
            (512, 1024, 64),
            (256, 2048, 128),
            (64, 4096, 256),
        ],
    )?;
    print_shared(&shared);
    report.insert("shared_decode".into(), serde_json::to_value(&shared)?);
    let read = bench::kernels::read_gbs(dev)?;
    report.insert("read_gbs".into(), read.into());
    print_attention(&att, read);
    report.insert("attention".into(), serde_json::to_value(&att)?);
    Ok(())
}

#[cfg(feature = "cuda")]
fn print_shared(shared: &[bench::attention::SharedRow]) {
    println!("decode attention over a shared prefix (the engine's build): batch shared+own keys, µs per layer without the plan, then with it per build of the shared launch (rows per item, stages; r64s2 is the engine's), then over the own keys alone");
    for r in shared {
        let cells: Vec<String> = r
            .shared_us
            .iter()
            .map(|(b, us)| format!("{b} {us:>7.1}"))
            .collect();
        println!(
            "  {:>4} {:>5}+{:<4} {:>8.1}  {}  own {:>7.1}",
            r.batch,
            r.shared,
            r.own,
            r.plain_us,
            cells.join("  "),
            r.own_us
        );
    }
}

/// The decode builds per case against the read ceiling `read` (GB/s).
#[cfg(feature = "cuda")]
fn print_attention(att: &[bench::attention::AttnRow], read: f64) {
    println!(
        "decode attention (32 q / 8 kv heads, d 128): batch ctx, then GB/s and % of the read ceiling ({read:.0} GB/s) and µs per build (warps x stages; * the engine's), then the swizzled f16 builds (sw: unpadded stages; the engine's at head dim 128), the widening build over an FP8 cache (fp8) and the direct FP8 builds (f8d)"
    );
    for case in att.chunk_by(|a, b| (a.batch, a.ctx) == (b.batch, b.ctx)) {
        let cells: Vec<String> = case
            .iter()
            .map(|r| {
                let mark = if r.default { "*" } else { " " };
                let fp8 = match (r.fp8, r.direct, r.swizzled) {
                    (true, true, _) => " f8d",
                    (true, false, _) => " fp8",
                    (false, _, true) => " sw",
                    _ => "",
                };
                let (v, pct) = (r.variant, 100.0 * r.gbs / read);
                format!(
                    "{}x{}{mark}{fp8} {:>5.0} {pct:>3.0}% {:>6.1}us",
                    v.warps, v.stages, r.gbs, r.us
                )
            })
            .collect();
        println!(
            "  {:>4} {:>5}  {}",
            case[0].batch,
            case[0].ctx,
            cells.join("  ")
        );
    }
}

/// Flash prefill beside cuBLAS's rate `matmul`.
#[cfg(feature = "cuda")]
fn prefill_tables(
    dev: &candle_core::Device,
    matmul: f64,
    report: &mut Report,
) -> anyhow::Result<()> {
    // W3's prompts (four, and one: a W3 step's prefill), W1's, a long one,
    // short ones, and W4's own tokens after its shared prefix.
    let cases = [
        (4, 2048, 0),
        (1, 2048, 0),
        (16, 512, 0),
        (1, 4096, 0),
        (64, 128, 0),
        (128, 64, 1024),
    ];
    let pre = bench::attention::prefill_table(dev, &cases)?;
    println!(
        "flash prefill (32 q / 8 kv heads, d 128, causal): seqs tokens+cached us TFLOP/s, then over an FP8 cache, then the wgmma kernels, plain, pipelined (Hopper; the engine's for long prompts) and pipelined across items (wsx; not the engine's)  (cuBLAS {matmul:.0})"
    );
    let f = |x| fmt_opt(x, 0);
    for r in &pre {
        println!(
            "  {:>4} {:>5}+{:<5} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7}",
            r.seqs,
            r.tokens,
            r.cached,
            f(r.us),
            f(r.tflops),
            f(r.fp8_us),
            f(r.fp8_tflops),
            f(r.wg_us),
            f(r.wg_tflops),
            f(r.ws_us),
            f(r.ws_tflops),
            f(r.wsx_us),
            f(r.wsx_tflops)
        );
    }
    report.insert("prefill".into(), serde_json::to_value(&pre)?);
    Ok(())
}

/// The workloads of `args`, each printed and added to the report.
fn workloads(
    spec: &JobSpec,
    args: &BenchArgs<'_>,
    matmul: f64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let mut fleet = bench::fleet(spec, args.tokenizer, args.breakdown)?;
    let devices: Vec<String> = fleet.devices().iter().map(|d| d.to_string()).collect();
    println!("devices: {}", devices.join(", "));
    report.insert("devices".into(), devices.into());
    let mut results = Vec::new();
    for name in args.workloads {
        let mut w = *WORKLOADS
            .iter()
            .find(|w| w.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                anyhow::anyhow!("unknown workload `{name}`, expected W1, W2, W3 or W4")
            })?;
        w.prompts = ((w.prompts as f64 * args.scale).round() as usize).max(1);
        let r = bench::run_workload(&mut fleet, spec, &w, matmul)?;
        println!(
            "{}: {} prompts x ({}+{} in, {} out): {:.0} output tok/s, {:.0} total tok/s, {:.1} s, peak GPU {}, {:.1}% of the compute floor, {} prefix-hit tokens, {} preemptions",
            w.name, w.prompts, w.shared_prefix, w.own, w.out, r.output_tok_s, r.total_tok_s, r.wall_s,
            r.peak_gpu_gib.map_or("-".into(), |g| format!("{g:.1} GiB")), 100.0 * r.compute_floor_fraction, r.prefix_hit_tokens, r.summary.preemptions
        );
        if let Some(b) = &r.summary.breakdown {
            print_breakdown(b);
        }
        results.push(r);
    }
    report.insert("workloads".into(), serde_json::to_value(&results)?);
    Ok(())
}

/// Per step kind: the steps' average device milliseconds per kernel class
/// and each class's share.
fn print_breakdown(b: &crate::backend::timeline::Breakdown) {
    for (kind, t) in &b.kinds {
        let total: f64 = t.ms.values().sum();
        let steps = t.steps.max(1) as f64;
        println!(
            "  {kind}: {} steps, {:.0} tokens and {:.0} sequences per step, {:.3} ms per step",
            t.steps,
            t.tokens as f64 / steps,
            t.seqs as f64 / steps,
            total / steps
        );
        if t.periods > 0 {
            // Device time, then the host's work before the next forward.
            let period = t.period_ms / t.periods as f64;
            println!(
                "    step period {period:.3} ms: {:.3} ms of it beside the device time (the GPU waits on the host)",
                period - total / steps
            );
        }
        if !t.host_ms.is_empty() {
            let phases: Vec<String> = t
                .host_ms
                .iter()
                .map(|(p, ms)| format!("{p} {:.3}", ms / steps))
                .collect();
            println!("    host ms/step: {}", phases.join(", "));
        }
        let mut classes: Vec<(&String, &f64)> = t.ms.iter().collect();
        classes.sort_by(|a, b| b.1.total_cmp(a.1));
        for (class, ms) in classes {
            println!(
                "    {class:<14} {:>9.3} ms/step {:>5.1}%",
                ms / steps,
                100.0 * ms / total.max(1e-12)
            );
        }
    }
}
