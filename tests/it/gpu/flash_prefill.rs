//! The flash prefill kernels on the GPU: against a float64 reference,
//! across chunkings of a prompt, and the wgmma builds against each other.

use super::{gpu, host, rel_err, Lcg};
use candle_core::{DType, Tensor};
use half::f16;
use runner::cuda;

/// A flash prefill launch ([`cuda::flash_prefill`] or its wgmma twin).
type Prefill = fn(
    &Tensor,
    cuda::CacheLayer<'_>,
    &Tensor,
    (&Tensor, usize),
    &Tensor,
    &cuda::PrefillShape,
) -> runner::Result<()>;

#[test]
fn flash_prefill_matches_a_float64_reference() {
    let dev = gpu();
    let mut rng = Lcg(77);
    // (heads, kv heads, head dim, window): Mistral's 4 query heads per KV
    // head at every head dim, then 1, 2 and 8 (a block's 128 rows are
    // 128 / G tokens of G heads).
    let cases = [
        (8usize, 2usize, 16usize, 0usize),
        (8, 2, 16, 40),
        (8, 2, 64, 0),
        (8, 2, 128, 0),
        (8, 2, 128, 50),
        (4, 4, 32, 0),
        (4, 2, 64, 40),
        (16, 2, 128, 0),
    ];
    for (nh, nkv, d, window) in cases {
        // Three sequences' chunks: a first chunk of 70 queries (ragged at
        // every tile size), a later chunk of 33 queries after 100 cached
        // positions, and one of 140 after 130 (key tiles wholly visible to
        // a tile, which skip the mask); the cache rows are scattered.
        let chunks = [(0usize, 70usize), (100, 33), (130, 140)];
        let t: usize = chunks.iter().map(|c| c.1).sum();
        let total_keys: usize = chunks.iter().map(|c| c.0 + c.1).sum();
        let cache_rows = total_keys + 37;
        let row = nkv * d;
        let kc = rng.f16s(cache_rows * row, 1.0);
        let vc = rng.f16s(cache_rows * row, 1.0);
        let q = rng.f16s(t * nh * d, 1.0);
        // A permutation of the cache rows, handed out to the sequences.
        let mut rows: Vec<u32> = (0..cache_rows as u32).collect();
        for i in (1..rows.len()).rev() {
            let j = (rng.next().abs() * 1e6) as usize % (i + 1);
            rows.swap(i, j);
        }
        let mut keys = Vec::new();
        let mut pc = Vec::new();
        let mut row0 = 0;
        for &(start, n) in &chunks {
            pc.push(cuda::PrefillChunk {
                row0,
                n,
                start,
                key_off: keys.len(),
            });
            keys.extend_from_slice(&rows[keys.len()..keys.len() + start + n]);
            row0 += n;
        }
        let scale = f16::from_f32(1.0 / (d as f32).sqrt());
        let mut want = vec![0f64; t * nh * d];
        for (c, &(start, n)) in pc.iter().zip(&chunks) {
            for i in 0..n {
                let pos = start + i;
                let lo = if window > 0 {
                    (pos + 1).saturating_sub(window)
                } else {
                    0
                };
                for h in 0..nh {
                    let kvh = h / (nh / nkv);
                    let qrow = &q[(c.row0 + i) * nh * d + h * d..][..d];
                    let s: Vec<f64> = (lo..=pos)
                        .map(|j| {
                            let r = keys[c.key_off + j] as usize * row + kvh * d;
                            let dot: f32 =
                                (0..d).map(|e| qrow[e].to_f32() * kc[r + e].to_f32()).sum();
                            (f16::from_f32(dot) * scale).to_f64()
                        })
                        .collect();
                    let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    for (jj, j) in (lo..=pos).enumerate() {
                        let p = (s[jj] - mx).exp() / z;
                        let r = keys[c.key_off + j] as usize * row + kvh * d;
                        for e in 0..d {
                            want[(c.row0 + i) * nh * d + h * d + e] += p * vc[r + e].to_f64();
                        }
                    }
                }
            }
        }
        let up = |v: Vec<f16>, s: (usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
        let (kct, vct) = (up(kc, (cache_rows, row)), up(vc, (cache_rows, row)));
        let qt = up(q, (t, nh * d));
        let nk = keys.len();
        let keyt = Tensor::from_vec(keys, nk, &dev).unwrap();
        let (tiles, ntiles) = cuda::prefill_tiles(&pc, nh / nkv, &dev).unwrap();
        let worst = |got: &[f32]| {
            got.iter()
                .zip(&want)
                .map(|(a, b)| {
                    if a.is_finite() {
                        (*a as f64 - b).abs()
                    } else {
                        f64::INFINITY
                    }
                })
                .fold(0f64, f64::max)
        };
        let shape = cuda::PrefillShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            window,
        };
        // The mma.sync kernel, and on Hopper at head dim 128 the wgmma one
        // (kernels/attention_wg.cu), against the same reference.
        // The wgmma kernels differ only in scheduling: the same bits.
        let mut kernels: Vec<(&str, Prefill)> = vec![("mma.sync", cuda::flash_prefill)];
        if d == 128 && cuda::wgmma_runs_on(&dev) {
            kernels.push(("wgmma", |q, c, k, t, o, s| {
                cuda::flash_prefill_wg(q, c, k, t, o, s, cuda::WgPrefill::Plain)
            }));
            kernels.push(("wgmma pipelined", |q, c, k, t, o, s| {
                cuda::flash_prefill_wg(q, c, k, t, o, s, cuda::WgPrefill::Pipelined)
            }));
            kernels.push(("wgmma crossed", |q, c, k, t, o, s| {
                cuda::flash_prefill_wg(q, c, k, t, o, s, cuda::WgPrefill::Crossed)
            }));
        }
        let mut plain_wg = None;
        for (name, kernel) in kernels {
            let out = Tensor::zeros((t, nh * d), DType::F16, &dev).unwrap();
            let cache = cuda::CacheLayer::f16(&kct, &vct);
            kernel(&qt, cache, &keyt, (&tiles, ntiles), &out, &shape).unwrap();
            let got = host(&out);
            let e = worst(&got);
            assert!(
                e < 4e-3,
                "{name} flash prefill {nh}/{nkv} heads, d {d}, window {window}: max abs err {e}"
            );
            match name {
                "wgmma" => plain_wg = Some(got),
                "wgmma pipelined" | "wgmma crossed" => {
                    let plain = plain_wg.as_ref().expect("the plain wgmma kernel ran first");
                    let differ = got
                        .iter()
                        .zip(plain)
                        .filter(|(a, b)| a.to_bits() != b.to_bits())
                        .count();
                    assert_eq!(
                        differ, 0,
                        "{nh}/{nkv} heads, window {window}: {differ} values of {name} differ from the plain wgmma kernel's"
                    );
                }
                _ => {}
            }
        }
    }
}

#[test]
fn flash_prefill_of_a_row_does_not_depend_on_how_its_prompt_is_chunked() {
    // A 150-token prompt as one chunk, then as chunks of 70 and 80 (the
    // second over the cache the first wrote): every query row is the same
    // bit for bit, though its tile, its tile's last key and the key tiles
    // wholly masked for it differ between the two.
    let dev = gpu();
    let mut rng = Lcg(91);
    let (nh, nkv, d, n) = (32usize, 8usize, 128usize, 150usize);
    for window in [0usize, 50] {
        let row = nkv * d;
        let up = |v: Vec<f16>, s: (usize, usize)| Tensor::from_vec(v, s, &dev).unwrap();
        let kc = up(rng.f16s(n * row, 1.0), (n, row));
        let vc = up(rng.f16s(n * row, 1.0), (n, row));
        let q: Vec<f16> = rng.f16s(n * nh * d, 1.0);
        let keys = Tensor::from_vec((0..n as u32).rev().collect::<Vec<u32>>(), n, &dev).unwrap();
        let shape = cuda::PrefillShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            window,
        };
        let run = |kernel: Prefill, chunks: &[(usize, usize)]| -> Vec<f32> {
            let mut out = Vec::new();
            for &(start, len) in chunks {
                let qt = up(
                    q[start * nh * d..(start + len) * nh * d].to_vec(),
                    (len, nh * d),
                );
                let pc = [cuda::PrefillChunk {
                    row0: 0,
                    n: len,
                    start,
                    key_off: 0,
                }];
                let (tiles, ntiles) = cuda::prefill_tiles(&pc, nh / nkv, &dev).unwrap();
                let o = Tensor::zeros((len, nh * d), DType::F16, &dev).unwrap();
                let cache = cuda::CacheLayer::f16(&kc, &vc);
                kernel(&qt, cache, &keys, (&tiles, ntiles), &o, &shape).unwrap();
                out.extend(host(&o));
            }
            out
        };
        // The mma.sync kernel, and on Hopper the pipelined wgmma ones.
        let mut kernels: Vec<(&str, Prefill)> = vec![("mma.sync", cuda::flash_prefill)];
        if cuda::wgmma_runs_on(&dev) {
            kernels.push(("wgmma pipelined", |q, c, k, t, o, s| {
                cuda::flash_prefill_wg(q, c, k, t, o, s, cuda::WgPrefill::Pipelined)
            }));
            kernels.push(("wgmma crossed", |q, c, k, t, o, s| {
                cuda::flash_prefill_wg(q, c, k, t, o, s, cuda::WgPrefill::Crossed)
            }));
        }
        for (name, kernel) in kernels {
            let whole = run(kernel, &[(0, n)]);
            let split = run(kernel, &[(0, 70), (70, n - 70)]);
            assert_eq!(whole.len(), split.len());
            for (i, (a, b)) in whole.iter().zip(&split).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{name}, window {window}: query {} head {} dim {}",
                    i / (nh * d),
                    i / d % nh,
                    i % d
                );
            }
        }
    }
}

/// Step 1 of kernels/WGMMA-PREFILL-PLAN.md: the warpgroup products of the
/// wgmma flash prefill over its swizzled shared-memory layout (S = Q K^T
/// with both operands from shared memory, O = P V with V read transposed)
/// against float64 products of the same f16 values. Before Hopper the
/// kernel does not exist and the wrapper says so.
#[test]
fn wgmma_prefill_products_match_float64() {
    let dev = gpu();
    let mut rng = Lcg(23);
    let (q, k, p, v) = (
        rng.f16s(64 * 128, 1.0),
        rng.f16s(128 * 128, 1.0),
        rng.f16s(64 * 128, 1.0),
        rng.f16s(128 * 128, 1.0),
    );
    let t = |x: &[f16], rows: usize| Tensor::from_vec(x.to_vec(), (rows, 128), &dev).unwrap();
    let got = cuda::wg_prefill_selftest(&t(&q, 64), &t(&k, 128), &t(&p, 64), &t(&v, 128));
    let Ok((s, o)) = got else {
        assert!(
            !cuda::wgmma_runs_on(&dev),
            "the wgmma self-test failed on Hopper: {got:?}"
        );
        return;
    };
    let f = |x: &[f16], i: usize| x[i].to_f64();
    let want_s: Vec<f64> = (0..64 * 128)
        .map(|i| {
            (0..128)
                .map(|d| f(&q, (i / 128) * 128 + d) * f(&k, (i % 128) * 128 + d))
                .sum()
        })
        .collect();
    let want_o: Vec<f64> = (0..64 * 128)
        .map(|i| {
            (0..128)
                .map(|j| f(&p, (i / 128) * 128 + j) * f(&v, j * 128 + i % 128))
                .sum()
        })
        .collect();
    let (es, eo) = (rel_err(&host(&s), &want_s), rel_err(&host(&o), &want_o));
    assert!(es < 1e-5, "S = Q K^T from shared memory: rel err {es}");
    assert!(eo < 1e-5, "O = P V with V transposed: rel err {eo}");
}

#[test]
fn crossed_wgmma_prefill_equals_the_pipelined_one_over_many_items() {
    // The crossed build overlaps an item's last PV with the next item's
    // first S, which happens only where a block takes several items: more
    // items than multiprocessors (Mistral's heads, prompts of 2,100 and
    // 900 tokens after 300 cached: ~100 tiles x 8 KV heads), with and
    // without a window. Scheduling only: the same bits. Before Hopper the
    // wgmma kernels do not run.
    let dev = gpu();
    if !cuda::wgmma_runs_on(&dev) {
        return;
    }
    let mut rng = Lcg(37);
    let (nh, nkv, d) = (32usize, 8usize, 128usize);
    let chunks = [(0usize, 2100usize), (300, 900)];
    let t: usize = chunks.iter().map(|c| c.1).sum();
    let total_keys: usize = chunks.iter().map(|c| c.0 + c.1).sum();
    let row = nkv * d;
    let f16s = |rng: &mut Lcg, n: usize, shape: (usize, usize)| {
        Tensor::from_vec(rng.f16s(n, 1.0), shape, &dev).unwrap()
    };
    let kc = f16s(&mut rng, total_keys * row, (total_keys, row));
    let vc = f16s(&mut rng, total_keys * row, (total_keys, row));
    let q = f16s(&mut rng, t * nh * d, (t, nh * d));
    let (mut pc, mut row0, mut key_off) = (Vec::new(), 0, 0);
    for &(start, n) in &chunks {
        pc.push(cuda::PrefillChunk {
            row0,
            n,
            start,
            key_off,
        });
        row0 += n;
        key_off += start + n;
    }
    let keys: Vec<u32> = (0..total_keys as u32).rev().collect();
    let keys = Tensor::from_vec(keys, total_keys, &dev).unwrap();
    let (tiles, ntiles) = cuda::prefill_tiles(&pc, nh / nkv, &dev).unwrap();
    assert!(
        ntiles * nkv > 2 * 132,
        "{ntiles} tiles: too few items to cross"
    );
    for window in [0usize, 700] {
        let shape = cuda::PrefillShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            window,
        };
        let run = |which| {
            let out = Tensor::zeros((t, nh * d), DType::F16, &dev).unwrap();
            let cache = cuda::CacheLayer::f16(&kc, &vc);
            cuda::flash_prefill_wg(&q, cache, &keys, (&tiles, ntiles), &out, &shape, which)
                .unwrap();
            host(&out)
        };
        let (a, b) = (
            run(cuda::WgPrefill::Pipelined),
            run(cuda::WgPrefill::Crossed),
        );
        assert!(a.iter().all(|x| x.is_finite()) && a.iter().any(|&x| x != 0.0));
        let differ = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "window {window}: {differ} values of the crossed build differ"
        );
    }
}
