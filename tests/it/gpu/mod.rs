//! The CUDA path (built with `--features cuda`; these tests need a GPU and
//! fail, never skip, without one). Every kernel against its CPU twin on
//! fresh random inputs at several sizes, tile multiples or not; the fixture
//! checkpoints' logits and greedy tokens on the GPU.

use candle_core::{DType, Device, Tensor};
use half::f16;
use runner::cuda;

mod attention;
mod flash_prefill;
mod gptq;
mod invariant;
mod kv_fp8;
mod lt;
mod overlap;
mod prefill;
mod sampler;

fn gpu() -> Device {
    runner::cuda::single_stream_device(0).expect("the `cuda` feature's tests need a CUDA GPU")
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn f16s(&mut self, n: usize, scale: f32) -> Vec<f16> {
        (0..n).map(|_| f16::from_f32(self.next() * scale)).collect()
    }
}

/// Block tables for contexts `ctx` of `bs`-token blocks, the block ids
/// shuffled over all of them so that no table is contiguous: (tables
/// [ctx.len() * max blocks], max blocks, total blocks).
fn shuffled_tables(rng: &mut Lcg, ctx: &[usize], bs: usize) -> (Vec<u32>, usize, usize) {
    let per: Vec<usize> = ctx.iter().map(|c| c.div_ceil(bs)).collect();
    let total: usize = per.iter().sum();
    let mut ids: Vec<u32> = (0..total as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        ids.swap(i, j);
    }
    let maxb = *per.iter().max().unwrap();
    let mut tables = vec![0u32; ctx.len() * maxb];
    let mut at = 0;
    for (b, &nb) in per.iter().enumerate() {
        tables[b * maxb..b * maxb + nb].copy_from_slice(&ids[at..at + nb]);
        at += nb;
    }
    (tables, maxb, total)
}

/// A decode batch over a shared prefix: every sequence holds the same
/// first `shared` blocks of `bs` tokens, then its own, except the last but
/// one where there are more than two (its own blocks from the start); and
/// the host's plan of the partitions they share (`group` query heads per
/// KV head, `rows` rows per item): (tables [ctx.len() * maxb], maxb, total
/// blocks, plan).
fn shared_prefix_batch(
    ctx: &[usize],
    bs: usize,
    shared: usize,
    group: usize,
    rows: usize,
) -> (
    Vec<u32>,
    usize,
    usize,
    runner::backend::decode_plan::SharedParts,
) {
    let own: Vec<usize> = ctx.iter().map(|&c| c.div_ceil(bs)).collect();
    let total = shared + own.iter().sum::<usize>();
    let maxb = *own.iter().max().unwrap();
    let mut tables = vec![0u32; ctx.len() * maxb];
    let mut next = shared as u32;
    for (i, &n) in own.iter().enumerate() {
        let alone = ctx.len() > 2 && i == ctx.len() - 2;
        for j in 0..n {
            tables[i * maxb + j] = if j < shared && !alone {
                j as u32
            } else {
                next += 1;
                next - 1
            };
        }
    }
    let ids: Vec<Vec<runner::kv::BlockId>> = (0..ctx.len())
        .map(|i| {
            tables[i * maxb..i * maxb + own[i]]
                .iter()
                .map(|&b| runner::kv::BlockId(b))
                .collect()
        })
        .collect();
    let refs: Vec<&[runner::kv::BlockId]> = ids.iter().map(|t| t.as_slice()).collect();
    let lens: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
    let shape = runner::backend::decode_plan::PlanShape {
        rows,
        ..runner::backend::decode_plan::PlanShape::new(bs, cuda::DECODE_PART, group)
    };
    let plan = runner::backend::decode_plan::plan(&refs, &lens, shape).expect("shared partitions");
    (tables, maxb, total, plan)
}

/// The decode tests' shapes: (query heads, KV heads, head dim, block
/// size, window): several partitions (and the combine), a window, every
/// head dim.
const DECODE_CASES: [(usize, usize, usize, usize, usize); 5] = [
    (32, 8, 128, 16, 0),
    (8, 2, 16, 16, 64),
    (32, 8, 128, 16, 700),
    (8, 2, 64, 8, 0),
    (16, 1, 32, 16, 0),
];

/// The decode tests' contexts: one key, part of a block, one partition,
/// several.
const DECODE_CTX: [usize; 5] = [1, 17, 300, 1100, 2500];

/// The shape of a [`DECODE_CASES`] case over [`DECODE_CTX`] (a window
/// bounds the visible keys).
fn decode_case_shape(
    (nh, nkv, d, bs, window): (usize, usize, usize, usize, usize),
) -> cuda::DecodeShape {
    cuda::DecodeShape {
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        window,
        max_keys: if window > 0 { 2500.min(window) } else { 2500 },
    }
}

/// A decode batch for [`decode_reference`]: sequence b's context is
/// ctx[b], its blocks row b of `tables` [ctx.len() * maxb].
struct DecodeCase<'a> {
    nh: usize,
    nkv: usize,
    d: usize,
    bs: usize,
    window: usize,
    ctx: &'a [usize],
    tables: &'a [u32],
    maxb: usize,
}

/// Decode attention in float64: per sequence and query head,
/// softmax(q k^T / sqrt(d)) v over its visible keys (the last `window`; 0:
/// all), k and v cache rows [slots, nkv * d]; rows [sequence, head, d].
fn decode_reference(c: &DecodeCase<'_>, q: &[f64], k: &[f64], v: &[f64]) -> Vec<f64> {
    let (nh, d, row) = (c.nh, c.d, c.nkv * c.d);
    let scale = 1.0 / (d as f64).sqrt();
    let mut want = Vec::new();
    for (b, &n) in c.ctx.iter().enumerate() {
        let pos = n - 1;
        let lo = if c.window > 0 {
            (pos + 1).saturating_sub(c.window)
        } else {
            0
        };
        let slot = |j: usize| c.tables[b * c.maxb + j / c.bs] as usize * c.bs + j % c.bs;
        for h in 0..nh {
            let at = |j: usize| slot(j) * row + h / (nh / c.nkv) * d;
            let qv = &q[(b * nh + h) * d..][..d];
            let s: Vec<f64> = (lo..=pos)
                .map(|j| qv.iter().zip(&k[at(j)..]).map(|(a, b)| a * b).sum::<f64>() * scale)
                .collect();
            let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            for dd in 0..d {
                let o: f64 = (lo..=pos).zip(&e).map(|(j, p)| p / z * v[at(j) + dd]).sum();
                want.push(o);
            }
        }
    }
    want
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-30)).sqrt()
}

/// How many values differ between two outputs (`-0.0` equals `0.0`): a
/// count, so that a failed bit-identity assertion does not print millions
/// of values.
fn differing(a: &[f32], b: &[f32]) -> usize {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest |got - want| / max(|want|, 0.01).
fn worst_rel(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
        .fold(0f32, f32::max)
}

#[test]
fn fused_norm_and_silu_match_the_cpu_ops() {
    let dev = gpu();
    let mut rng = Lcg(5);
    // 999: not a multiple of 8, the kernels' one-half-per-access path.
    for (rows, h) in [
        (1usize, 4096usize),
        (37, 128),
        (5, 1000),
        (3, 999),
        (2, 8192),
        (4, 40),
    ] {
        let x = rng.f16s(rows * h, 2.0);
        let a = rng.f16s(rows * h, 2.0);
        let w = rng.f16s(h, 1.0);
        let cpu =
            |v: &Vec<f16>, s: (usize, usize)| Tensor::from_vec(v.clone(), s, &Device::Cpu).unwrap();
        let (xc, ac, wc) = (
            cpu(&x, (rows, h)),
            cpu(&a, (rows, h)),
            Tensor::from_vec(w.clone(), h, &Device::Cpu).unwrap(),
        );
        let r = (&xc + &ac).unwrap();
        let rf = r.to_dtype(DType::F32).unwrap();
        let var = rf.sqr().unwrap().mean_keepdim(1).unwrap();
        let want = rf
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap()
            .broadcast_mul(&wc)
            .unwrap();
        let (xg, ag, wg) = (
            xc.to_device(&dev).unwrap(),
            ac.to_device(&dev).unwrap(),
            wc.to_device(&dev).unwrap(),
        );
        // Both builds: a thread per vector (the engine's) and 128 threads
        // of up to 8 vectors.
        for one in [true, false] {
            let (out, res) = cuda::rmsnorm_add_with(&xg, Some(&ag), &wg, 1e-5, one).unwrap();
            assert_eq!(host(&res), host(&r), "residual add");
            let worst = worst_rel(&host(&out), &host(&want));
            assert!(
                worst < 2e-3,
                "rmsnorm rows {rows} h {h} one {one}: worst rel {worst}"
            );
        }
        let sm = cuda::silu_mul(&xg, &ag).unwrap();
        let want = (xc.silu().unwrap() * &ac).unwrap();
        // Column slices of one fused [gate | up] output, read in place.
        let fused = Tensor::cat(&[&xg, &ag], 1).unwrap();
        let sliced = cuda::silu_mul(
            &fused.narrow(1, 0, h).unwrap(),
            &fused.narrow(1, h, h).unwrap(),
        )
        .unwrap();
        assert_eq!(
            host(&sliced),
            host(&sm),
            "silu_mul over slices, rows {rows} h {h}"
        );
        let worst = worst_rel(&host(&sm), &host(&want));
        assert!(
            worst < 2e-3,
            "silu_mul rows {rows} h {h}: worst rel {worst}"
        );
    }
}

#[test]
fn fixture_logits_on_the_gpu_match_gptqmodel_fp16() {
    let dev = gpu();
    for m in crate::common::models() {
        crate::reference_logits::check_model(m, true, &dev);
    }
}

#[test]
fn gpu_logits_match_the_cpu_path() {
    let dev = gpu();
    let fx = crate::common::fixtures();
    let seqs = crate::common::json(&fx.join("references/sequences.json"));
    for m in crate::common::models() {
        let load = |d: &Device| {
            runner::model::load(&fx.join(m), &runner::model::LoadOptions::new(DType::F16, d))
                .unwrap()
        };
        let (cpu, gpu_m) = (load(&Device::Cpu), load(&dev));
        for (name, ids) in seqs["sequences"].as_object().unwrap() {
            let ids: Vec<u32> = crate::common::token_ids(ids);
            let a = host(&cpu.logits_full(&ids).unwrap());
            let b = host(&gpu_m.logits_full(&ids).unwrap());
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 0.05,
                "{m} {name}: GPU vs CPU f16 logits differ by {worst}"
            );
        }
    }
}

#[test]
fn greedy_submit_on_the_gpu_matches_reference_generations() {
    for m in crate::common::models() {
        crate::submit_greedy::check(m, true, &["engine.device=cuda"]);
    }
}

#[test]
fn rope_kernel_matches_hf_f16_order() {
    let dev = gpu();
    let mut rng = Lcg(21);
    for (t, nq, nk, d) in [
        (5usize, 32usize, 8usize, 128usize),
        (33, 8, 2, 16),
        (1, 4, 4, 64),
    ] {
        let positions: Vec<u32> = (0..t as u32).map(|i| (i * 37 + 5) % 3000).collect();
        let half_d = d / 2;
        let p = 3000;
        let cos = rng.f16s(p * half_d, 1.0);
        let sin = rng.f16s(p * half_d, 1.0);
        let q = rng.f16s(t * nq * d, 2.0);
        let k = rng.f16s(t * nk * d, 2.0);
        let rot = |x: &[f16], heads: usize| -> Vec<f16> {
            let mut out = x.to_vec();
            for (ti, &pos) in positions.iter().enumerate() {
                let pp = pos as usize;
                for h in 0..heads {
                    let base = (ti * heads + h) * d;
                    for j in 0..half_d {
                        let (c, s) = (cos[pp * half_d + j], sin[pp * half_d + j]);
                        let (x1, x2) = (x[base + j], x[base + j + half_d]);
                        out[base + j] = x1 * c + (-x2) * s;
                        out[base + j + half_d] = x2 * c + x1 * s;
                    }
                }
            }
            out
        };
        let (wq, wk) = (rot(&q, nq), rot(&k, nk));
        let up = |v: Vec<f16>, s: (usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
        // q and k as column slices of one fused [q | k | v] output.
        let v = up(rng.f16s(t * nk * d, 2.0), (t, nk * d));
        let qkv = Tensor::cat(&[&up(q, (t, nq * d)), &up(k, (t, nk * d)), &v], 1).unwrap();
        let (gq, gk) = cuda::rope_qk(
            &qkv.narrow(1, 0, nq * d).unwrap(),
            &qkv.narrow(1, nq * d, nk * d).unwrap(),
            &up(cos, (p, half_d)),
            &up(sin, (p, half_d)),
            &Tensor::from_vec(positions, t, &dev).unwrap(),
            d,
        )
        .unwrap();
        for (got, want, what) in [(host(&gq), wq, "q"), (host(&gk), wk, "k")] {
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                let ulp = f16::from_f32(b.to_f32().abs()).to_f32() * 2f32.powi(-10);
                assert!(
                    (a - b.to_f32()).abs() <= ulp.max(6e-8),
                    "rope {what} t {t} d {d} at {i}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn rope_with_the_cache_write_matches_rope_then_the_write() {
    // One kernel (rotated k and v straight to their cache rows) against
    // rope_qk and kv_write, on column slices of a fused [q | k | v].
    let dev = gpu();
    let mut rng = Lcg(23);
    for (t, nq, nk, d) in [(37usize, 32usize, 8usize, 128usize), (5, 8, 2, 16)] {
        let (half_d, p, slots_total) = (d / 2, 4096usize, 300usize);
        let up = |v: Vec<f16>, s: (usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
        let cos = up(rng.f16s(p * half_d, 1.0), (p, half_d));
        let sin = up(rng.f16s(p * half_d, 1.0), (p, half_d));
        let width = (nq + 2 * nk) * d;
        let qkv = up(rng.f16s(t * width, 2.0), (t, width));
        let (q, k, v) = (
            qkv.narrow(1, 0, nq * d).unwrap(),
            qkv.narrow(1, nq * d, nk * d).unwrap(),
            qkv.narrow(1, (nq + nk) * d, nk * d).unwrap(),
        );
        let positions: Vec<u32> = (0..t as u32).map(|i| (i * 131 + 7) % p as u32).collect();
        let positions = Tensor::from_vec(positions, t, &dev).unwrap();
        let slots: Vec<u32> = (0..t as u32)
            .map(|i| (i * 7 + 3) % slots_total as u32)
            .collect();
        let slots = Tensor::from_vec(slots, t, &dev).unwrap();
        let init = rng.f16s(slots_total * nk * d, 1.0);
        let cache = || up(init.clone(), (slots_total, nk * d));
        let (kc1, vc1, kc2, vc2) = (cache(), cache(), cache(), cache());
        let fused = cuda::rope_qkv_cache(
            (&q, &k, &v),
            &cos,
            &sin,
            &positions,
            d,
            (&kc1, &vc1),
            &slots,
        )
        .unwrap()
        .expect("whole 16-byte rows take the fused kernel");
        let (q2, k2) = cuda::rope_qk(&q, &k, &cos, &sin, &positions, d).unwrap();
        cuda::kv_write(&k2, &v, &kc2, &vc2, &slots).unwrap();
        assert_eq!(host(&fused), host(&q2), "q, t {t} d {d}");
        assert_eq!(host(&kc1), host(&kc2), "key cache, t {t} d {d}");
        assert_eq!(host(&vc1), host(&vc2), "value cache, t {t} d {d}");
    }
}

#[test]
fn kv_write_puts_every_row_in_its_slot() {
    let dev = gpu();
    let mut rng = Lcg(41);
    let (slots_total, row, n) = (512usize, 8 * 128usize, 77usize);
    let mut slots: Vec<u32> = (0..slots_total as u32).collect();
    for i in (1..slots.len()).rev() {
        let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
        slots.swap(i, j);
    }
    slots.truncate(n);
    let k = rng.f16s(n * row, 1.0);
    let v = rng.f16s(n * row, 1.0);
    let init = rng.f16s(slots_total * row, 1.0);
    let kc = Tensor::from_vec(init.clone(), (slots_total, row), &dev).unwrap();
    let vc = Tensor::from_vec(init.clone(), (slots_total, row), &dev).unwrap();
    // v as a column slice of a wider output (rows 2 * row apart), read in place.
    let vw = Tensor::from_vec(v.clone(), (n, row), &dev).unwrap();
    let wide = Tensor::cat(&[&vw, &vw.zeros_like().unwrap()], 1).unwrap();
    cuda::kv_write(
        &Tensor::from_vec(k.clone(), (n, row), &dev).unwrap(),
        &wide.narrow(1, 0, row).unwrap(),
        &kc,
        &vc,
        &Tensor::from_vec(slots.clone(), n, &dev).unwrap(),
    )
    .unwrap();
    let (hk, hv) = (host(&kc), host(&vc));
    let mut expect_k: Vec<f32> = init.iter().map(|x| x.to_f32()).collect();
    let mut expect_v = expect_k.clone();
    for (i, &s) in slots.iter().enumerate() {
        for c in 0..row {
            expect_k[s as usize * row + c] = k[i * row + c].to_f32();
            expect_v[s as usize * row + c] = v[i * row + c].to_f32();
        }
    }
    assert_eq!(hk, expect_k, "keys");
    assert_eq!(hv, expect_v, "values: untouched slots keep their contents");
}
