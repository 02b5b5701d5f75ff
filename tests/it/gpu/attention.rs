//! Attention kernels on the GPU: paged decode against a float64
//! reference, across batches, across builds and over shared-prefix plans
//! (flash prefill: `flash_prefill.rs`).

use runner::backend::decode_plan::{ITEM_ROWS, TILE_ROWS};

use super::{
    decode_case_shape, decode_reference, gpu, host, rel_err, shared_prefix_batch, shuffled_tables,
    DecodeCase, Lcg, DECODE_CASES, DECODE_CTX,
};
use candle_core::{DType, Tensor};
use half::f16;
use runner::cuda::{self, DecodeShape};

#[test]
fn paged_decode_matches_a_float64_reference() {
    let dev = gpu();
    let mut rng = Lcg(11);
    for (nh, nkv, d, bs, window) in DECODE_CASES {
        let ctx = DECODE_CTX;
        let (tables, maxb, total) = shuffled_tables(&mut rng, &ctx, bs);
        let row = nkv * d;
        let kc = rng.f16s(total * bs * row, 1.0);
        let vc = rng.f16s(total * bs * row, 1.0);
        let q = rng.f16s(ctx.len() * nh * d, 1.0);
        let f64s = |x: &[f16]| -> Vec<f64> { x.iter().map(|v| v.to_f64()).collect() };
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
        let want = decode_reference(&case, &f64s(&q), &f64s(&kc), &f64s(&vc));
        let t = |v: Vec<f16>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev).unwrap();
        let out = cuda::paged_decode(
            &t(q, (ctx.len(), nh * d)),
            cuda::CacheLayer::f16(&t(kc, (total * bs, row)), &t(vc, (total * bs, row))),
            &Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap(),
            &Tensor::from_vec(
                ctx.iter().map(|&c| c as u32).collect::<Vec<_>>(),
                ctx.len(),
                &dev,
            )
            .unwrap(),
            &decode_case_shape((nh, nkv, d, bs, window)),
        )
        .unwrap();
        let e = rel_err(&host(&out), &want);
        assert!(
            e < 2e-3,
            "decode nh {nh} nkv {nkv} d {d} window {window}: rel err {e}"
        );
    }
}

#[test]
fn swizzled_decode_builds_equal_the_padded_ones_bit_for_bit() {
    // The `sw` builds (unpadded, swizzled stage rows; head dim 128) move
    // only where K and V sit in shared memory, and stages only how many
    // tiles are in flight: every output equals the padded build's of the
    // same warps, with and without a window, over contexts of one key to
    // several partitions.
    let dev = gpu();
    let mut rng = Lcg(19);
    for (nh, nkv, d, bs, window) in DECODE_CASES.into_iter().filter(|c| c.2 == 128) {
        let ctx = DECODE_CTX;
        let (tables, maxb, total) = shuffled_tables(&mut rng, &ctx, bs);
        let row = nkv * d;
        let t = |v: Vec<f16>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev).unwrap();
        let kc = t(rng.f16s(total * bs * row, 1.0), (total * bs, row));
        let vc = t(rng.f16s(total * bs * row, 1.0), (total * bs, row));
        let q = t(rng.f16s(ctx.len() * nh * d, 1.0), (ctx.len(), nh * d));
        let tables = Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap();
        let lens: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
        let lens = Tensor::from_vec(lens, ctx.len(), &dev).unwrap();
        let shape = decode_case_shape((nh, nkv, d, bs, window));
        let padded = cuda::CacheLayer::f16(&kc, &vc);
        let run = |c, v| host(&cuda::paged_decode_with(&q, c, &tables, &lens, &shape, v).unwrap());
        for v in cuda::DecodeVariant::SWIZZLED {
            // The padded build of the same warps (stages do not touch the sums).
            let twin = cuda::DecodeVariant::ALL
                .into_iter()
                .find(|p| p.warps == v.warps)
                .unwrap();
            let (a, b) = (run(padded, twin), run(padded.swizzled(), v));
            assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != 0.0));
            assert!(a == b, "{v:?} window {window}: the swizzled build differs");
        }
    }
}

#[test]
fn paged_decode_of_a_sequence_does_not_depend_on_its_batch() {
    // A sequence's row, alone (one partition, written directly) and beside
    // longer ones (several partitions, then the combine), bit for bit.
    let dev = gpu();
    let mut rng = Lcg(13);
    let (nh, nkv, d, bs) = (32usize, 8usize, 128usize, 16usize);
    let ctx = [300usize, 2500, 1100, 17];
    let per: Vec<usize> = ctx.iter().map(|c| c.div_ceil(bs)).collect();
    let total: usize = per.iter().sum();
    let row = nkv * d;
    let kc = Tensor::from_vec(rng.f16s(total * bs * row, 1.0), (total * bs, row), &dev).unwrap();
    let vc = Tensor::from_vec(rng.f16s(total * bs * row, 1.0), (total * bs, row), &dev).unwrap();
    let qs: Vec<Vec<f16>> = ctx.iter().map(|_| rng.f16s(nh * d, 2.0)).collect();
    let mut first = vec![0u32; ctx.len()];
    for i in 1..ctx.len() {
        first[i] = first[i - 1] + per[i - 1] as u32;
    }
    // The block tables, context lengths and shape of a batch of `seqs`.
    let batch = |seqs: &[usize], max_keys: usize| -> (Tensor, Tensor, DecodeShape) {
        let maxb = seqs.iter().map(|&i| per[i]).max().unwrap();
        let mut tables = vec![0u32; seqs.len() * maxb];
        for (r, &i) in seqs.iter().enumerate() {
            for j in 0..per[i] {
                tables[r * maxb + j] = first[i] + j as u32;
            }
        }
        let lens: Vec<u32> = seqs.iter().map(|&i| ctx[i] as u32).collect();
        let shape = DecodeShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            window: 0,
            max_keys,
        };
        (
            Tensor::from_vec(tables, (seqs.len(), maxb), &dev).unwrap(),
            Tensor::from_vec(lens, seqs.len(), &dev).unwrap(),
            shape,
        )
    };
    let run = |seqs: &[usize]| -> Vec<Vec<f32>> {
        let (tables, lens, shape) = batch(seqs, seqs.iter().map(|&i| ctx[i]).max().unwrap());
        let q: Vec<f16> = seqs.iter().flat_map(|&i| qs[i].clone()).collect();
        let q = Tensor::from_vec(q, (seqs.len(), nh * d), &dev).unwrap();
        let out = cuda::paged_decode(&q, cuda::CacheLayer::f16(&kc, &vc), &tables, &lens, &shape)
            .unwrap();
        let h = host(&out);
        h.chunks(nh * d).map(|c| c.to_vec()).collect()
    };
    let alone: Vec<Vec<f32>> = (0..ctx.len()).map(|i| run(&[i]).remove(0)).collect();
    // In place, as in a mixed step: the sequences' queries at rows 1, 3, 5,
    // 7 of a wider q, outputs to the same rows, the other rows untouched.
    let seqs = [0usize, 1, 2, 3];
    let width = nh * d;
    let mut qw = vec![f16::ZERO; 2 * seqs.len() * width];
    for (r, &i) in seqs.iter().enumerate() {
        qw[(2 * r + 1) * width..(2 * r + 2) * width].copy_from_slice(&qs[i]);
    }
    let q = Tensor::from_vec(qw, (2 * seqs.len(), width), &dev).unwrap();
    let out = Tensor::zeros((2 * seqs.len(), width), DType::F16, &dev).unwrap();
    let rows: Vec<u32> = (0..seqs.len() as u32).map(|r| 2 * r + 1).collect();
    let rows = Tensor::from_vec(rows, seqs.len(), &dev).unwrap();
    let (tables, lens, shape) = batch(&seqs, 2500);
    let io = cuda::DecodeIo {
        q: &q,
        rows: Some(&rows),
        out: &out,
        shared: None,
    };
    cuda::paged_decode_into(
        io,
        cuda::CacheLayer::f16(&kc, &vc),
        &tables,
        &lens,
        &shape,
        Default::default(),
    )
    .unwrap();
    let got = host(&out);
    for (r, &i) in seqs.iter().enumerate() {
        assert!(got[2 * r * width..(2 * r + 1) * width]
            .iter()
            .all(|&v| v == 0.0));
        assert!(
            got[(2 * r + 1) * width..(2 * r + 2) * width] == alone[i][..],
            "row {r} in place"
        );
    }
    for seqs in [vec![0usize, 1, 2, 3], vec![2, 0], vec![3, 1], vec![1, 1, 0]] {
        for (r, got) in run(&seqs).iter().enumerate() {
            let i = seqs[r];
            assert!(got.iter().all(|v| v.is_finite()));
            assert!(
                got == &alone[i],
                "sequence of {} keys in batch {seqs:?} differs from its run alone",
                ctx[i]
            );
        }
    }
}

#[test]
fn paged_decode_over_shared_prefix_blocks_is_bit_identical_with_and_without_the_plan() {
    // Sequences whose block tables start with the same blocks (as the
    // prefix cache hands them out): their full partitions there are read
    // once per item of up to 64 / G sequences (the engine's items; and 16
    // / G, one tile's), and every output must equal the unshared kernel's
    // bit for bit. Contexts: over the shared 1,024 keys and beyond,
    // exactly them, part of them (only partition 0 is full), and a
    // sequence of its own; 21 sequences (two items of 64 rows at G = 4);
    // then a batch of one partition (P = 1, written directly).
    let dev = gpu();
    let mut rng = Lcg(17);
    let (d, bs) = (128usize, 16usize);
    let shared_blocks = 1024 / bs;
    for (nh, nkv, ctx) in [
        (
            32usize,
            8usize,
            vec![1100usize, 1024, 1500, 600, 2000, 300, 1030],
        ),
        (32, 4, vec![1100, 1024, 2000, 700, 1200]),
        (32, 8, (0..21).map(|i| 1024 + 37 * i).collect()),
        (8, 8, vec![512, 512, 300, 512]),
    ] {
        let row = nkv * d;
        let (tables, maxb, total, plan) =
            shared_prefix_batch(&ctx, bs, shared_blocks, nh / nkv, TILE_ROWS);
        let plan64 = shared_prefix_batch(&ctx, bs, shared_blocks, nh / nkv, ITEM_ROWS).3;
        assert_eq!(plan64.rows, ITEM_ROWS);
        let kc =
            Tensor::from_vec(rng.f16s(total * bs * row, 1.0), (total * bs, row), &dev).unwrap();
        let vc =
            Tensor::from_vec(rng.f16s(total * bs * row, 1.0), (total * bs, row), &dev).unwrap();
        let lens: Vec<u32> = ctx.iter().map(|&c| c as u32).collect();
        assert!(plan.skip.contains(&0) && plan.skip.iter().any(|&s| s > 0));
        let tables = Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap();
        let lens = Tensor::from_vec(lens, ctx.len(), &dev).unwrap();
        let q =
            Tensor::from_vec(rng.f16s(ctx.len() * nh * d, 2.0), (ctx.len(), nh * d), &dev).unwrap();
        let shape = DecodeShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            window: 0,
            max_keys: *ctx.iter().max().unwrap(),
        };
        let padded = cuda::CacheLayer::f16(&kc, &vc);
        let run = |cache, sh: Option<&cuda::SharedDecode>| {
            let out = Tensor::zeros((ctx.len(), nh * d), DType::F16, &dev).unwrap();
            let io = cuda::DecodeIo {
                q: &q,
                rows: None,
                out: &out,
                shared: sh,
            };
            cuda::paged_decode_into(io, cache, &tables, &lens, &shape, Default::default()).unwrap();
            host(&out)
        };
        let plain = run(padded, None);
        assert!(plain.iter().all(|v| v.is_finite()) && plain.iter().any(|&v| v != 0.0));
        // Every stage count of the shared launch (pipelining only), items
        // of one tile and of four; the per-sequence launch padded and
        // swizzled (the engine's, beside the padded shared launch).
        let cases = [(&plan, 2), (&plan64, 2), (&plan64, 3), (&plan64, 4)];
        for ((p, stages), cache) in cases
            .into_iter()
            .flat_map(|c| [(c, padded), (c, padded.swizzled())])
        {
            let plan = cuda::SharedDecode::new(p, &dev).unwrap();
            let with = run(cache, Some(&plan.with_stages(stages)));
            for (i, (a, b)) in plain.chunks(nh * d).zip(with.chunks(nh * d)).enumerate() {
                assert!(
                    a == b,
                    "nh {nh} nkv {nkv} rows {} stages {stages} swizzled {}: sequence {i} of {} keys differs with the plan",
                    p.rows,
                    cache.swizzled,
                    ctx[i]
                );
            }
        }
    }
}
