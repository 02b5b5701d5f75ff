//! GPTQ products on the GPU against the exact CPU dequantization and
//! float64 products, and the batch invariance of each product's rows.

use super::{differing, gpu, host, rel_err, Lcg};
use candle_core::{DType, Tensor};
use half::f16;
use runner::cuda::{self, GptqGpu};
use runner::model::linear::GptqMode;
use runner::model::linear::{RandomGptq, TiledGptq};

#[test]
fn gptq_kernels_match_the_exact_cpu_dequantization() {
    let dev = gpu();
    let mut rng = Lcg(42);
    for (bits, group, k, n) in [
        (4, Some(128), 1024, 768),
        (4, Some(32), 200, 96),
        (4, Some(64), 512, 200),
        (4, None, 128, 24),
        (8, None, 384, 100),
        (8, Some(32), 96, 40),
        // One chunk of 64 sorted positions (the large-M product's shortest K).
        (4, Some(32), 64, 48),
        (8, Some(128), 1024, 256),
        // More than one block along K (split-K reduction), ragged last block.
        (4, Some(128), 2304, 200),
        (8, Some(64), 1344, 136),
    ] {
        let w = RandomGptq {
            bits,
            group_size: group,
            k,
            n,
            act_order: true,
            seed: k as u64 * 31 + n as u64,
        }
        .build();
        // The oracle: GPTQ's f16 weights from the plain CPU dequantization.
        let w16: Vec<f16> = w
            .dequantize_nk()
            .iter()
            .map(|&v| f16::from_f32(v))
            .collect(); // [N, K]
        let g = GptqGpu::upload(&TiledGptq::from_weight(&w).unwrap(), &dev).unwrap();
        let mut resident = g.clone();
        resident.make_resident().unwrap();
        let wt = g
            .dequantize()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for kk in 0..k {
            for nn in 0..n {
                assert_eq!(
                    wt[kk][nn],
                    w16[nn * k + kk].to_f32(),
                    "dequant kernel, bits {bits} group {group:?} k {kk} n {nn}"
                );
            }
        }
        for m in [1usize, 3, 7, 16, 33, 100, 300] {
            if m == 300 && k < 1300 {
                continue; // chunking over M: once per bit width is enough
            }
            let x = rng.f16s(m * k, 1.0);
            let want: Vec<f64> = (0..m)
                .flat_map(|i| {
                    let (x, w16) = (&x, &w16);
                    (0..n).map(move |j| {
                        (0..k)
                            .map(|kk| x[i * k + kk].to_f64() * w16[j * k + kk].to_f64())
                            .sum::<f64>()
                    })
                })
                .collect();
            let xt = Tensor::from_vec(x, (m, k), &dev).unwrap();
            // `packed`: the warpgroup product above 16 tokens on Hopper,
            // dequantize + cuBLAS elsewhere.
            for (path, layer) in [
                (GptqMode::Fused, &resident),
                (GptqMode::FusedPacked, &g),
                (GptqMode::Dequant, &g),
                (GptqMode::Resident, &resident),
                (GptqMode::Auto { max_m: 16 }, &resident),
                (GptqMode::Packed { max_m: 16 }, &g),
            ] {
                let y = host(&layer.forward(&xt, path).unwrap());
                let e = rel_err(&y, &want);
                assert!(
                    e < 2e-3,
                    "{path:?} bits {bits} group {group:?} k {k} n {n} m {m}: rel err {e}"
                );
            }
            // The large-M products: the tiled mma.sync one (not used by the
            // engine) and, on Hopper, every launch of the warpgroup one.
            let e = rel_err(&host(&g.tiled(&xt).unwrap()), &want);
            assert!(
                e < 2e-3,
                "tiled bits {bits} group {group:?} k {k} n {n} m {m}: rel err {e}"
            );
            for l in wg_launches(&g, k) {
                let e = rel_err(&host(&g.wg_tuned(&xt, l).unwrap()), &want);
                assert!(
                    e < 2e-3,
                    "wg {l:?} bits {bits} group {group:?} k {k} n {n} m {m}: rel err {e}"
                );
            }
        }
    }
}

/// The warpgroup product's launches to check: every built shape, unsplit
/// and split along K in three (or as many as K's chunks of 64 allow). None
/// before Hopper, where the product does not exist (sm_90a code) and
/// `packed` runs dequantize + cuBLAS.
fn wg_launches(g: &GptqGpu, k: usize) -> Vec<cuda::WgLaunch> {
    if !g.wg_runs_here() {
        return Vec::new();
    }
    let chunks = k.div_ceil(64);
    g.wg_shapes()
        .into_iter()
        .flat_map(|(bm, nw)| [1, 3.min(chunks)].map(|splits| cuda::WgLaunch { bm, nw, splits }))
        .collect()
}

/// cuBLAS's detour (`CUBLAS_PADS`): Mistral-7B's gate+up (K 4096, N 28672)
/// at 128 tokens runs padded to 144 rows on Hopper; its rows are the plain
/// product's up to the f16 rounding of two cuBLAS kernels.
#[test]
fn the_padded_cublas_product_gives_the_plain_products_rows() {
    let dev = gpu();
    let (k, n, m) = (4096, 28672, 128);
    let spec = RandomGptq {
        bits: 4,
        group_size: Some(128),
        k,
        n,
        act_order: true,
        seed: 3,
    };
    let mut g = GptqGpu::dummy(&spec, &dev).unwrap();
    g.make_resident().unwrap();
    assert_eq!(g.cublas_pad(m), g.wg_runs_here().then_some(144));
    assert_eq!(g.cublas_pad(m + 1), None);
    let x = Tensor::from_vec(Lcg(5).f16s(m * k, 1.0), (m, k), &dev).unwrap();
    let plain: Vec<f64> = host(&x.matmul(&g.dequantize().unwrap()).unwrap())
        .into_iter()
        .map(f64::from)
        .collect();
    let got = host(&g.forward(&x, GptqMode::Resident).unwrap());
    assert_eq!(got.len(), m * n);
    let e = rel_err(&got, &plain);
    assert!(e < 1e-3, "padded against plain cuBLAS: rel err {e}");
}

#[test]
fn fused_gptq_rows_do_not_depend_on_the_batch() {
    let dev = gpu();
    let mut rng = Lcg(7);
    // K of 4160: two blocks along K of 2560 sorted positions, the last one
    // ragged; up to 8 staged tokens of such a block fill more than the
    // 48 KiB of shared memory a kernel gets without opting in.
    let (k, n) = (4160, 4096);
    for bits in [4, 8] {
        let w = RandomGptq {
            bits,
            group_size: Some(128),
            k,
            n,
            act_order: true,
            seed: 3,
        }
        .build();
        let g = GptqGpu::upload(&TiledGptq::from_weight(&w).unwrap(), &dev).unwrap();
        let mut resident = g.clone();
        resident.make_resident().unwrap();
        // The batch-invariant modes: a row's output is the same bits at any
        // M from 1 to 4096. `fused`: split-free cuBLASLt over the f16 copy
        // (whose algorithm changes with M; padded below 16 rows);
        // `fused_packed`: on Hopper the warpgroup product at every M,
        // elsewhere the small-M fused kernel.
        let big = Tensor::from_vec(rng.f16s(4096 * k, 1.0), (4096, k), &dev).unwrap();
        let ms = (1..=20).chain([31, 63, 64, 65, 127, 128, 129, 255, 256, 300, 511, 512, 513]);
        let ms: Vec<usize> = ms
            .chain([1000, 1023, 1024, 1025, 2048, 2049, 4095])
            .collect();
        for (mode, layer) in [(GptqMode::Fused, &resident), (GptqMode::FusedPacked, &g)] {
            let all = host(&layer.forward(&big, mode).unwrap());
            for &m in &ms {
                let y = host(&layer.forward(&big.narrow(0, 0, m).unwrap(), mode).unwrap());
                let d = differing(&y, &all[..m * n]);
                assert_eq!(
                    d, 0,
                    "{bits}-bit {mode:?}: {d} values of M={m} vs M=4096 differ"
                );
            }
        }
        let x = big.narrow(0, 0, 300).unwrap();
        // The small-M fused kernel (the `fused` mode before Hopper) at its
        // widest launch; every other launch choice is compared with it below.
        let full = host(&g.fused_tuned(&x, 4, 0).unwrap());
        let tiled = host(&g.tiled(&x).unwrap());
        let wg_full: Vec<Vec<f32>> = wg_launches(&g, k)
            .into_iter()
            .map(|l| host(&g.wg_tuned(&x, l).unwrap()))
            .collect();
        for m in [1usize, 3, 4, 5, 8, 9, 16, 17, 64, 129] {
            let xm = x.narrow(0, 0, m).unwrap();
            // The large-M products sum K in one order whatever M is.
            assert_eq!(
                host(&g.tiled(&xm).unwrap()),
                tiled[..m * n].to_vec(),
                "{bits}-bit tiled: rows of M={m} vs M=300 differ"
            );
            for (l, rows) in wg_launches(&g, k).into_iter().zip(&wg_full) {
                assert_eq!(
                    &host(&g.wg_tuned(&xm, l).unwrap()),
                    &rows[..m * n],
                    "{bits}-bit wg {l:?}: rows of M={m} vs M=300 differ"
                );
            }
            let part = host(&g.fused_tuned(&xm, 4, 0).unwrap());
            assert_eq!(
                part,
                full[..m * n].to_vec(),
                "{bits}-bit fused kernel: rows of M={m} vs M=300 differ"
            );
            if m <= 17 {
                // Every launch choice (column tiles per warp, activation
                // stage): the same bits.
                for c in [1, 2, 4] {
                    for stage in [0u8, 1] {
                        if stage == 1 && m > cuda::STAGE_MAX_M {
                            continue;
                        }
                        let y = host(&g.fused_tuned(&xm, c, stage).unwrap());
                        assert_eq!(y, part, "{bits}-bit M={m} c={c} stage={stage}");
                    }
                }
            }
        }
        // The block's shape sets the wgmma instruction's N, not the order of
        // an output's sum: every shape gives the same bits per K split.
        let launches = wg_launches(&g, k);
        for (a, la) in launches.iter().enumerate() {
            for (b, lb) in launches.iter().enumerate().skip(a + 1) {
                if la.splits == lb.splits {
                    assert_eq!(
                        wg_full[a], wg_full[b],
                        "{bits}-bit wg launches {la:?} vs {lb:?}"
                    );
                }
            }
        }
    }
}
