//! The FP8 KV cache on the GPU: the quantizing write against
//! `quant::fp8` bit for bit; decode (with and without a shared-partition
//! plan) and flash prefill over FP8 codes bit-identical to the f16 kernels
//! over the same values widened on the host (`f16(decode(code) * scale)`);
//! the fixtures' logits and greedy tokens with FP8 KV within the CPU
//! test's bounds.

use super::{
    decode_case_shape, decode_reference, gpu, host, rel_err, shared_prefix_batch, shuffled_tables,
    DecodeCase, Lcg, DECODE_CASES, DECODE_CTX,
};
use candle_core::{DType, Device, Tensor};
use half::f16;
use runner::backend::decode_plan::ITEM_ROWS;
use runner::cuda::{self, CacheLayer, DecodeShape};
use runner::quant::fp8;

/// An FP8 cache written by the kernel from random f16 rows, and the f16
/// cache holding exactly its values.
struct Pair {
    k8: Tensor,
    v8: Tensor,
    ks: Tensor,
    vs: Tensor,
    k16: Tensor,
    v16: Tensor,
}

impl Pair {
    fn fp8(&self) -> CacheLayer<'_> {
        CacheLayer::fp8(&self.k8, &self.v8, &self.ks, &self.vs)
    }

    /// The FP8 cache's values, `decode(code) * scale`, unrounded: (k, v).
    fn exact(&self) -> (Vec<f64>, Vec<f64>) {
        let f = |codes: &Tensor, scales: &Tensor| -> Vec<f64> {
            let c: Vec<u8> = codes.flatten_all().unwrap().to_vec1().unwrap();
            let s: Vec<f32> = scales.flatten_all().unwrap().to_vec1().unwrap();
            let d = c.len() / s.len();
            c.iter()
                .enumerate()
                .map(|(i, &x)| fp8::e4m3_decode(x) as f64 * s[i / d] as f64)
                .collect()
        };
        (f(&self.k8, &self.ks), f(&self.v8, &self.vs))
    }

    fn f16(&self) -> CacheLayer<'_> {
        CacheLayer::f16(&self.k16, &self.v16)
    }
}

/// `rows` cache slots of `nkv` heads of `d`: row r's values are of
/// magnitude 2^(r % 13 - 8) (so small rows meet E4M3's subnormals), row 3
/// of K is all zeros; they are written in reverse slot order. Checks every
/// code and scale against `quant::fp8::quantize_row` of the same values.
fn pair(dev: &Device, rng: &mut Lcg, rows: usize, nkv: usize, d: usize) -> Pair {
    let row = nkv * d;
    let mut gen = || -> Vec<f16> {
        (0..rows)
            .flat_map(|r| rng.f16s(row, 2f32.powi((r % 13) as i32 - 8)))
            .collect()
    };
    let mut k = gen();
    let v = gen();
    if rows > 3 {
        k[3 * row..4 * row].fill(f16::ZERO);
    }
    let slots: Vec<u32> = (0..rows as u32).rev().collect();
    let codes = || Tensor::zeros((rows, row), DType::U8, dev).unwrap();
    let scales = || Tensor::zeros((rows, nkv), DType::F32, dev).unwrap();
    let (k8, v8, ks, vs) = (codes(), codes(), scales(), scales());
    let cache = CacheLayer::fp8(&k8, &v8, &ks, &vs);
    let t = |x: &[f16]| Tensor::from_vec(x.to_vec(), (rows, row), dev).unwrap();
    let slot_t = Tensor::from_vec(slots.clone(), rows, dev).unwrap();
    cuda::kv_write_fp8(&t(&k), &t(&v), cache, d, &slot_t).unwrap();
    let widen = |src: &[f16], codes: &Tensor, scales: &Tensor, what: &str| -> Tensor {
        let c: Vec<u8> = codes.flatten_all().unwrap().to_vec1().unwrap();
        let s: Vec<f32> = scales.flatten_all().unwrap().to_vec1().unwrap();
        let mut out = vec![f16::ZERO; rows * row];
        let mut want = vec![0u8; d];
        for (r, &slot) in slots.iter().enumerate() {
            for h in 0..nkv {
                let x: Vec<f32> = src[r * row + h * d..][..d]
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                let sc = fp8::quantize_row(&x, &mut want);
                let at = slot as usize * row + h * d;
                assert_eq!(
                    &c[at..at + d],
                    &want[..],
                    "{what}: codes of row {r} head {h}"
                );
                assert_eq!(
                    s[slot as usize * nkv + h].to_bits(),
                    sc.to_bits(),
                    "{what}: scale of row {r} head {h}"
                );
                for j in 0..d {
                    out[at + j] = f16::from_f32(fp8::e4m3_decode(c[at + j]) * sc);
                }
            }
        }
        Tensor::from_vec(out, (rows, row), dev).unwrap()
    };
    let k16 = widen(&k, &k8, &ks, "k");
    let v16 = widen(&v, &v8, &vs, "v");
    Pair {
        k8,
        v8,
        ks,
        vs,
        k16,
        v16,
    }
}

#[test]
fn fp8_decode_equals_the_f16_kernel_over_the_widened_values_and_direct_is_bounded() {
    // Several partitions (and the combine), a window, every head dim; the
    // block tables shuffled. The widening build: the f16 kernel's bits over
    // f16(decode * scale). The direct builds (codes into the mma
    // fragments, scales on the scores and on P): within the f16 decode
    // test's bound of attention in float64 over decode(code) * scale.
    let dev = gpu();
    let mut rng = Lcg(23);
    for (nh, nkv, d, bs, window) in DECODE_CASES {
        let ctx = DECODE_CTX;
        let (tables, maxb, total) = shuffled_tables(&mut rng, &ctx, bs);
        let p = pair(&dev, &mut rng, total * bs, nkv, d);
        let qh = rng.f16s(ctx.len() * nh * d, 1.0);
        let (kx, vx) = p.exact();
        let qx: Vec<f64> = qh.iter().map(|v| v.to_f64()).collect();
        let case = DecodeCase {
            nh,
            nkv,
            d,
            bs,
            window,
            ctx: &ctx,
            tables: &tables,
            maxb,
        };
        let exact = decode_reference(&case, &qx, &kx, &vx);
        let q = Tensor::from_vec(qh, (ctx.len(), nh * d), &dev).unwrap();
        let tables = Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap();
        let lens: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
        let lens = Tensor::from_vec(lens, ctx.len(), &dev).unwrap();
        let shape = decode_case_shape((nh, nkv, d, bs, window));
        let run =
            |c: CacheLayer<'_>| host(&cuda::paged_decode(&q, c, &tables, &lens, &shape).unwrap());
        let (a, b) = (run(p.fp8()), run(p.f16()));
        assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
        assert!(
            a == b,
            "decode nh {nh} nkv {nkv} d {d} window {window}: fp8 differs"
        );
        let mut first = None;
        for v in cuda::DecodeVariant::FP8_DIRECT {
            let out = cuda::paged_decode_with(&q, p.fp8().direct(), &tables, &lens, &shape, v);
            let got = host(&out.unwrap());
            let e = rel_err(&got, &exact);
            assert!(
                e < 2e-3,
                "direct fp8 decode {v:?} nh {nh} nkv {nkv} d {d} window {window}: rel err {e}"
            );
            // The stages only pipeline: every direct build gives the same bits.
            let first = first.get_or_insert(got.clone());
            assert!(*first == got, "direct fp8 decode {v:?} differs from w2s2");
        }
    }
}

#[test]
fn fp8_decode_over_shared_prefix_blocks_is_bit_identical_with_and_without_the_plan() {
    // Five sequences, four over the same first 1,024 keys' blocks.
    let dev = gpu();
    let mut rng = Lcg(29);
    let (nh, nkv, d, bs) = (32usize, 8usize, 128usize, 16usize);
    let ctx = [1100usize, 1024, 1500, 600, 2000];
    // Sequence 3 (the last but one) has its own blocks from the start.
    let (tables, maxb, total, plan) = shared_prefix_batch(&ctx, bs, 1024 / bs, nh / nkv, ITEM_ROWS);
    let lens: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
    let p = pair(&dev, &mut rng, total * bs, nkv, d);
    let tables = Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap();
    let lens = Tensor::from_vec(lens, ctx.len(), &dev).unwrap();
    let q = Tensor::from_vec(rng.f16s(ctx.len() * nh * d, 2.0), (ctx.len(), nh * d), &dev).unwrap();
    let shape = DecodeShape {
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        block_size: bs,
        window: 0,
        max_keys: 2000,
    };
    let sh = cuda::SharedDecode::new(&plan, &dev).unwrap();
    let run = |c: CacheLayer<'_>, shared: Option<&cuda::SharedDecode>| {
        let out = Tensor::zeros((ctx.len(), nh * d), DType::F16, &dev).unwrap();
        let io = cuda::DecodeIo {
            q: &q,
            rows: None,
            out: &out,
            shared,
        };
        let build = cuda::DecodeVariant::builds(&c)[0];
        cuda::paged_decode_into(io, c, &tables, &lens, &shape, build).unwrap();
        host(&out)
    };
    let want = run(p.f16(), None);
    assert!(want.iter().all(|v| v.is_finite()) && want.iter().any(|&v| v != 0.0));
    assert!(run(p.fp8(), None) == want, "fp8 decode differs from f16");
    assert!(
        run(p.fp8(), Some(&sh)) == want,
        "fp8 decode with the plan differs"
    );
    // The direct builds: their own bits, the same with and without it.
    let direct = run(p.fp8().direct(), None);
    assert!(direct.iter().all(|v| v.is_finite()) && direct.iter().any(|&v| v != 0.0));
    assert!(
        run(p.fp8().direct(), Some(&sh)) == direct,
        "direct fp8 decode with the plan differs"
    );
}

#[test]
fn fp8_flash_prefill_equals_the_f16_kernel_over_the_widened_values() {
    // Chunks from position 0 and after cached positions, a window, every
    // head dim and 1, 2, 4 and 8 query heads per KV head; cache rows
    // scattered.
    let dev = gpu();
    let mut rng = Lcg(31);
    for (nh, nkv, d, window) in [
        (8usize, 2usize, 16usize, 0usize),
        (8, 2, 64, 40),
        (8, 2, 128, 0),
        (4, 4, 32, 0),
        (16, 2, 128, 50),
        (32, 8, 128, 0),
    ] {
        let chunks = [(0usize, 70usize), (100, 33), (130, 140)];
        let t: usize = chunks.iter().map(|c| c.1).sum();
        let rows: usize = chunks.iter().map(|c| c.0 + c.1).sum::<usize>() + 37;
        let mut perm: Vec<u32> = (0..rows as u32).collect();
        for i in (1..perm.len()).rev() {
            let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
            perm.swap(i, j);
        }
        let (mut keys, mut pc, mut row0, mut used) = (Vec::new(), Vec::new(), 0, 0);
        for &(start, n) in &chunks {
            pc.push(cuda::PrefillChunk {
                row0,
                n,
                start,
                key_off: keys.len(),
            });
            keys.extend_from_slice(&perm[used..used + start + n]);
            used += start + n;
            row0 += n;
        }
        let p = pair(&dev, &mut rng, rows, nkv, d);
        let q = Tensor::from_vec(rng.f16s(t * nh * d, 1.0), (t, nh * d), &dev).unwrap();
        let nk = keys.len();
        let keys = Tensor::from_vec(keys, nk, &dev).unwrap();
        let (tiles, ntiles) = cuda::prefill_tiles(&pc, nh / nkv, &dev).unwrap();
        let shape = cuda::PrefillShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            window,
        };
        let run = |c: CacheLayer<'_>| {
            let out = Tensor::zeros((t, nh * d), DType::F16, &dev).unwrap();
            cuda::flash_prefill(&q, c, &keys, (&tiles, ntiles), &out, &shape).unwrap();
            host(&out)
        };
        let (a, b) = (run(p.fp8()), run(p.f16()));
        assert!(a.iter().all(|v| v.is_finite()) && a.iter().any(|&v| v != 0.0));
        assert!(
            a == b,
            "prefill nh {nh} nkv {nkv} d {d} window {window}: fp8 differs"
        );
    }
}

#[test]
fn fp8_kv_fixture_logits_on_the_gpu_stay_within_the_cpu_bound() {
    let dev = gpu();
    for m in crate::common::models() {
        let (worst, n, agree, clear) = crate::kv_fp8::compare_on(m, DType::F16, &dev);
        eprintln!("{m}: GPU fp8 KV worst |dlogit| / range {worst:.4} over {n} positions; argmax {agree}/{clear} where the margin is clear");
        assert!(worst <= crate::kv_fp8::MAX_REL_DIFF, "{m}: {worst}");
        assert_eq!(
            agree, clear,
            "{m}: argmax changed where the margin was clear"
        );
    }
}

#[test]
fn fp8_kv_greedy_submit_on_the_gpu_gives_the_reference_tokens() {
    // Through the real binary (prefill and decode over the FP8 cache),
    // every fixture generation, up to the CPU test's near-tie margin.
    let (mut compared, mut generated) = (0, 0);
    for m in crate::common::models() {
        let (c, g) = crate::submit_greedy::check_upto(
            m,
            true,
            &["engine.device=cuda", "engine.kv_cache_dtype=fp8"],
            crate::kv_fp8::GREEDY_MARGIN,
        );
        compared += c;
        generated += g;
    }
    eprintln!("GPU fp8 KV greedy: {compared} of {generated} tokens compared, all equal");
    assert!(
        compared * 2 >= generated,
        "only {compared} of {generated} tokens had a clear margin"
    );
}
