//! cuBLASLt products (the kernel bench's algorithm table) against candle's
//! `matmul`: the glue's layouts (W^T as column-major [N, K], x as [K, M])
//! give the same product through every algorithm the heuristic offers.

use super::{differing, gpu, host, Lcg};
use candle_core::Tensor;
use runner::cuda;

fn max_excess(y: &Tensor, want: &Tensor) -> f32 {
    let (y, w) = (host(y), host(want));
    // One f16 rounding apart at most (2^-10 relative), with room for the
    // f32 sums' order: excess over 2^-9 of the value's size.
    y.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() - b.abs().max(1.0) / 512.0)
        .fold(f32::MIN, f32::max)
}

#[test]
fn lt_products_match_candle_matmul_through_every_offered_algorithm() {
    let dev = gpu();
    let mut rng = Lcg(17);
    for (m, k, n) in [
        (1, 256, 512),
        (37, 4096, 1024),
        (130, 1024, 4096),
        (515, 512, 768),
    ] {
        let x = Tensor::from_vec(rng.f16s(m * k, 1.0), (m, k), &dev).unwrap();
        let wt = Tensor::from_vec(rng.f16s(k * n, 0.05), (k, n), &dev).unwrap();
        let want = x.matmul(&wt).unwrap();
        let p = cuda::LtProduct::new(&x, m, n, k).unwrap();
        let algos = p.algos(16).unwrap();
        assert!(
            !algos.is_empty(),
            "no cuBLASLt algorithm for {m} x {k} x {n}"
        );
        // The split-free algorithms' outputs, to compare with each other.
        let mut split_free: Vec<(String, Tensor)> = Vec::new();
        for a in &algos {
            let y = p.run(&x, &wt, a).unwrap();
            assert_eq!(y.dims(), [m, n]);
            let e = max_excess(&y, &want);
            assert!(
                e <= 0.0,
                "{m} x {k} x {n}, algorithm {a:?}: off by {e} past 2^-9"
            );
            if a.splits() == 1 {
                split_free.push((a.describe(), y));
            }
        }
        // The claim `engine.cublas_tuning` and BENCHMARKS.md run 94 rest
        // on: every algorithm without a K split gives the same values.
        if let Some(((first, y0), rest)) = split_free.split_first() {
            for (name, y) in rest {
                let ne = cuda::count_differing(y, y0).unwrap();
                assert_eq!(
                    ne, 0,
                    "{m} x {k} x {n}: {name} and {first} differ in {ne} values"
                );
            }
        }
    }
}

/// The engine's tuned products (`engine.cublas_tuning`) give cuBLAS's own
/// values at every M they time (256..1024) and cuBLAS's own outside it,
/// on Mistral-7B's gate+up and down.
#[test]
fn tuned_products_give_cublas_values_at_every_token_count() {
    let dev = gpu();
    let mut rng = Lcg(23);
    cuda::set_cublas_tuning(true);
    for (k, n) in [(4096, 28672), (14336, 4096)] {
        let wt = Tensor::from_vec(rng.f16s(k * n, 0.05), (k, n), &dev).unwrap();
        for m in [200, 256, 508, 700, 1100] {
            let x = Tensor::from_vec(rng.f16s(m * k, 1.0), (m, k), &dev).unwrap();
            let want = x.matmul(&wt).unwrap();
            let got = cuda::tuned_product(&x, &wt).unwrap();
            assert!(
                got.is_some() <= (256..1024).contains(&m),
                "{m} x {k} x {n}: tuned outside 256..1024 tokens"
            );
            if let Some(y) = got {
                let ne = cuda::count_differing(&y, &want).unwrap();
                assert_eq!(ne, 0, "{m} x {k} x {n}: {ne} values differ from matmul's");
            }
        }
    }
    cuda::set_cublas_tuning(false); // the default, for the tests after this one
}

/// The batch-invariant product over a dense weight as a checkpoint stores
/// it ([N, K], the LM head in a `fused` job): the product's values, and
/// each row the same bits at every M (padded below 16 rows, the algorithm
/// changing with M), in both weight layouts.
#[test]
fn invariant_products_keep_each_rows_bits_at_every_m() {
    let dev = gpu();
    let mut rng = Lcg(23);
    let (k, n, top) = (4096, 32000, 2048);
    let x = Tensor::from_vec(rng.f16s(top * k, 1.0), (top, k), &dev).unwrap();
    let w = Tensor::from_vec(rng.f16s(n * k, 0.05), (n, k), &dev).unwrap();
    let wt = w.t().unwrap().contiguous().unwrap();
    let want = x.matmul(&wt).unwrap();
    for (layout, weight) in [(cuda::WeightLayout::Nk, &w), (cuda::WeightLayout::Kn, &wt)] {
        let all = cuda::invariant_product(&x, weight, layout).unwrap();
        let e = max_excess(&all, &want);
        assert!(e <= 0.0, "{layout:?}: off by {e} past 2^-9");
        let all = host(&all);
        for m in [
            1usize, 2, 7, 15, 16, 17, 33, 100, 128, 129, 512, 777, 1024, 2047,
        ] {
            let xm = x.narrow(0, 0, m).unwrap();
            let y = host(&cuda::invariant_product(&xm, weight, layout).unwrap());
            let d = differing(&y, &all[..m * n]);
            assert_eq!(d, 0, "{layout:?}: {d} values of M={m} vs M={top} differ");
        }
    }
}

/// The fixtures' products (hidden 128, q/k/v 128/32/32 and fused 192,
/// gate/up 384 and fused 768, down over 384, LM head 32,002) through the
/// batch-invariant product in both weight layouts: each row the same bits
/// at M = 1..=72 and more as at 1,024, one kernel family (algorithm id) at
/// every M. Beside it (printed, not asserted) the heuristic's own first
/// split-free choice per M, of any family, and how many of its values
/// differ from the invariant product's.
#[test]
fn invariant_products_keep_each_rows_bits_at_the_fixtures_shapes() {
    let dev = gpu();
    let mut rng = Lcg(29);
    let top = 1024;
    let ms: Vec<usize> = (1..=72)
        .chain([100, 128, 129, 200, 256, 300, 511, 700, 1000, 1023])
        .collect();
    let nks = [
        (128, 128),
        (32, 128),
        (192, 128),
        (384, 128),
        (768, 128),
        (128, 384),
        (32002, 128),
    ];
    for (n, k) in nks {
        let x = Tensor::from_vec(rng.f16s(top * k, 1.0), (top, k), &dev).unwrap();
        let w = Tensor::from_vec(rng.f16s(n * k, 0.1), (n, k), &dev).unwrap();
        let wt = w.t().unwrap().contiguous().unwrap();
        let want = x.matmul(&wt).unwrap();
        for (layout, weight) in [(cuda::WeightLayout::Nk, &w), (cuda::WeightLayout::Kn, &wt)] {
            let all = cuda::invariant_product(&x, weight, layout).unwrap();
            let e = max_excess(&all, &want);
            assert!(e <= 0.0, "{n}x{k} {layout:?}: off by {e} past 2^-9");
            let (algo, _) = cuda::invariant_plan(&x, (top, n, k), layout).unwrap();
            let family = |a: &str| a.split('/').next().unwrap_or_default().to_string();
            let all = host(&all);
            let mut old = Vec::new();
            for &m in &ms {
                let xm = x.narrow(0, 0, m).unwrap();
                let (a, _) = cuda::invariant_plan(&xm, (m, n, k), layout).unwrap();
                assert_eq!(
                    family(&a),
                    family(&algo),
                    "{n}x{k} {layout:?}: M={m} runs {a}, at M={top} {algo}"
                );
                let y = host(&cuda::invariant_product(&xm, weight, layout).unwrap());
                let d = differing(&y, &all[..m * n]);
                assert_eq!(
                    d, 0,
                    "{n}x{k} {layout:?}: {d} values of M={m} vs M={top} differ"
                );
                old.push(heuristic_choice(&x, weight, (m, n, k), layout, &all));
            }
            eprintln!("{n}x{k} {layout:?} at M={top} {algo}; per-M heuristic: {old:?}");
        }
    }
}

/// The heuristic's first split-free algorithm at `m` rows (16 at least)
/// and how many of the first `m` rows' values differ from `all`'s (the
/// invariant product's).
fn heuristic_choice(
    x: &Tensor,
    weight: &Tensor,
    (m, n, k): (usize, usize, usize),
    layout: cuda::WeightLayout,
    all: &[f32],
) -> (usize, String, usize) {
    let rows = m.max(16);
    let xm = x.narrow(0, 0, rows).unwrap().contiguous().unwrap();
    let p = cuda::LtProduct::with_layout(&xm, (rows, n, k), layout).unwrap();
    let Some(a) = p.algos(32).unwrap().into_iter().find(|a| a.split_free()) else {
        return (m, "none".into(), 0);
    };
    let y = host(&p.run(&xm, weight, &a).unwrap());
    (m, a.describe(), differing(&y[..m * n], &all[..m * n]))
}
