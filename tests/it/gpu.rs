//! The CUDA path (built with `--features cuda`; these tests need a GPU and
//! fail, never skip, without one). Every kernel against its CPU twin on
//! fresh random inputs at several sizes, tile multiples or not; the fixture
//! checkpoints' logits and greedy tokens on the GPU.

use candle_core::{DType, Device, Tensor};
use half::f16;
use runner::cuda::{self, DecodeShape, GptqGpu};
use runner::model::linear::GptqMode;
use runner::model::linear::{RandomGptq, TiledGptq};

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

fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

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
            if m == 300 && k < 2000 {
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
            for path in [
                GptqMode::Fused,
                GptqMode::Dequant,
                GptqMode::Resident,
                GptqMode::Auto { max_m: 16 },
            ] {
                let layer = if path == GptqMode::Dequant || path == GptqMode::Fused {
                    &g
                } else {
                    &resident
                };
                let y = host(&layer.forward(&xt, path).unwrap());
                let e = rel_err(&y, &want);
                assert!(
                    e < 2e-3,
                    "{path:?} bits {bits} group {group:?} k {k} n {n} m {m}: rel err {e}"
                );
            }
        }
    }
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
        let x = Tensor::from_vec(rng.f16s(300 * k, 1.0), (300, k), &dev).unwrap();
        let full = host(&g.forward(&x, GptqMode::Fused).unwrap());
        for m in [1usize, 3, 4, 5, 8, 9, 16, 17, 64, 129] {
            let xm = x.narrow(0, 0, m).unwrap();
            let part = host(&g.forward(&xm, GptqMode::Fused).unwrap());
            assert_eq!(
                part,
                full[..m * n].to_vec(),
                "{bits}-bit: rows of M={m} vs M=300 differ"
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
    }
}

#[test]
fn paged_decode_matches_a_float64_reference() {
    let dev = gpu();
    let mut rng = Lcg(11);
    for (nh, nkv, d, bs, window) in [
        (32usize, 8usize, 128usize, 16usize, 0usize),
        (8, 2, 16, 16, 64),
        (32, 8, 128, 16, 700),
        (8, 2, 64, 8, 0),
        (16, 1, 32, 16, 0),
    ] {
        let ctx = [1usize, 17, 300, 1100, 2500];
        let blocks_per: Vec<usize> = ctx.iter().map(|c| c.div_ceil(bs)).collect();
        let total: usize = blocks_per.iter().sum();
        // Shuffled block ids, so tables are not contiguous.
        let mut ids: Vec<u32> = (0..total as u32).collect();
        for i in (1..ids.len()).rev() {
            let j = ((rng.next() + 1.0) * 0.5 * (i + 1) as f32) as usize % (i + 1);
            ids.swap(i, j);
        }
        let maxb = *blocks_per.iter().max().unwrap();
        let mut tables = vec![0u32; ctx.len() * maxb];
        let mut at = 0;
        for (b, &nb) in blocks_per.iter().enumerate() {
            tables[b * maxb..b * maxb + nb].copy_from_slice(&ids[at..at + nb]);
            at += nb;
        }
        let row = nkv * d;
        let kc = rng.f16s(total * bs * row, 1.0);
        let vc = rng.f16s(total * bs * row, 1.0);
        let q = rng.f16s(ctx.len() * nh * d, 1.0);
        let scale = 1.0 / (d as f64).sqrt();
        let mut want = Vec::new();
        for (b, &c) in ctx.iter().enumerate() {
            let pos = c - 1;
            let lo = if window > 0 {
                (pos + 1).saturating_sub(window)
            } else {
                0
            };
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let slot = |j: usize| tables[b * maxb + j / bs] as usize * bs + j % bs;
                let qv = &q[(b * nh + h) * d..(b * nh + h + 1) * d];
                let s: Vec<f64> = (lo..=pos)
                    .map(|j| {
                        let kr = &kc[slot(j) * row + kvh * d..][..d];
                        qv.iter()
                            .zip(kr)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for dd in 0..d {
                    let o: f64 = (lo..=pos)
                        .zip(&e)
                        .map(|(j, p)| p / z * vc[slot(j) * row + kvh * d + dd].to_f64())
                        .sum();
                    want.push(o);
                }
            }
        }
        let t = |v: Vec<f16>, shape: (usize, usize)| Tensor::from_vec(v, shape, &dev).unwrap();
        let out = cuda::paged_decode(
            &t(q, (ctx.len(), nh * d)),
            &t(kc, (total * bs, row)),
            &t(vc, (total * bs, row)),
            &Tensor::from_vec(tables, (ctx.len(), maxb), &dev).unwrap(),
            &Tensor::from_vec(
                ctx.iter().map(|&c| c as u32).collect::<Vec<_>>(),
                ctx.len(),
                &dev,
            )
            .unwrap(),
            &DecodeShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                block_size: bs,
                window,
                max_keys: if window > 0 { 2500.min(window) } else { 2500 },
            },
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
    let run = |seqs: &[usize]| -> Vec<Vec<f32>> {
        let maxb = seqs.iter().map(|&i| per[i]).max().unwrap();
        let mut tables = vec![0u32; seqs.len() * maxb];
        for (r, &i) in seqs.iter().enumerate() {
            for j in 0..per[i] {
                tables[r * maxb + j] = first[i] + j as u32;
            }
        }
        let q: Vec<f16> = seqs.iter().flat_map(|&i| qs[i].clone()).collect();
        let out = cuda::paged_decode(
            &Tensor::from_vec(q, (seqs.len(), nh * d), &dev).unwrap(),
            &kc,
            &vc,
            &Tensor::from_vec(tables, (seqs.len(), maxb), &dev).unwrap(),
            &Tensor::from_vec(
                seqs.iter().map(|&i| ctx[i] as u32).collect(),
                seqs.len(),
                &dev,
            )
            .unwrap(),
            &DecodeShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                block_size: bs,
                window: 0,
                max_keys: seqs.iter().map(|&i| ctx[i]).max().unwrap(),
            },
        )
        .unwrap();
        let h = host(&out);
        h.chunks(nh * d).map(|c| c.to_vec()).collect()
    };
    let alone: Vec<Vec<f32>> = (0..ctx.len()).map(|i| run(&[i]).remove(0)).collect();
    // In place, as in a mixed step: the sequences' queries at rows 1, 3, 5,
    // 7 of a wider q, outputs to the same rows, the other rows untouched.
    let seqs = [0usize, 1, 2, 3];
    let maxb = *per.iter().max().unwrap();
    let mut tables = vec![0u32; seqs.len() * maxb];
    for (r, &i) in seqs.iter().enumerate() {
        for j in 0..per[i] {
            tables[r * maxb + j] = first[i] + j as u32;
        }
    }
    let width = nh * d;
    let mut qw = vec![f16::ZERO; 2 * seqs.len() * width];
    for (r, &i) in seqs.iter().enumerate() {
        qw[(2 * r + 1) * width..(2 * r + 2) * width].copy_from_slice(&qs[i]);
    }
    let q = Tensor::from_vec(qw, (2 * seqs.len(), width), &dev).unwrap();
    let out = Tensor::zeros((2 * seqs.len(), width), DType::F16, &dev).unwrap();
    let rows: Vec<u32> = (0..seqs.len() as u32).map(|r| 2 * r + 1).collect();
    let rows = Tensor::from_vec(rows, seqs.len(), &dev).unwrap();
    cuda::paged_decode_into(
        cuda::DecodeIo {
            q: &q,
            rows: Some(&rows),
            out: &out,
        },
        &kc,
        &vc,
        &Tensor::from_vec(tables, (seqs.len(), maxb), &dev).unwrap(),
        &Tensor::from_vec(
            seqs.iter().map(|&i| ctx[i] as u32).collect(),
            seqs.len(),
            &dev,
        )
        .unwrap(),
        &DecodeShape {
            heads: nh,
            kv_heads: nkv,
            head_dim: d,
            block_size: bs,
            window: 0,
            max_keys: 2500,
        },
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
fn fused_norm_and_silu_match_the_cpu_ops() {
    let dev = gpu();
    let mut rng = Lcg(5);
    // 999: not a multiple of 8, the kernels' one-half-per-access path.
    for (rows, h) in [(1usize, 4096usize), (37, 128), (5, 1000), (3, 999)] {
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
        let (out, res) = cuda::rmsnorm_add(&xg, Some(&ag), &wg, 1e-5).unwrap();
        assert_eq!(host(&res), host(&r), "residual add");
        let (got, want) = (host(&out), host(&want));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
            .fold(0f32, f32::max);
        assert!(worst < 2e-3, "rmsnorm rows {rows} h {h}: worst rel {worst}");
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
        let (got, want) = (host(&sm), host(&want));
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs().max(1e-2))
            .fold(0f32, f32::max);
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

#[test]
fn gpu_topk_matches_the_host_samplers_order() {
    let dev = gpu();
    let mut rng = Lcg(51);
    for (rows, v, k) in [(5usize, 32002usize, 64usize), (3, 1000, 7), (4, 300, 1)] {
        let mut logits: Vec<f32> = (0..rows * v).map(|_| rng.next() * 6.0).collect();
        // Ties, infinities and NaN.
        for r in 0..rows {
            logits[r * v + 3] = 50.0;
            logits[r * v + 9] = 50.0;
            logits[r * v + 11] = f32::NAN;
            logits[r * v + 12] = f32::INFINITY;
            logits[r * v + 13] = f32::NEG_INFINITY;
        }
        let temps: Vec<f32> = (0..rows).map(|r| 0.3 + 0.4 * r as f32).collect();
        let t = Tensor::from_vec(logits.clone(), (rows, v), &dev).unwrap();
        let got = cuda::topk_rows(&t, &temps, k).unwrap();
        for r in 0..rows {
            let mut cand: Vec<(u32, f32)> = logits[r * v..(r + 1) * v]
                .iter()
                .enumerate()
                .filter(|(_, x)| x.is_finite())
                .map(|(i, &x)| (i as u32, x / temps[r]))
                .collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
            assert_eq!(got[r], cand, "rows {rows} v {v} k {k} row {r}");
        }
    }
}

#[test]
fn the_device_sampler_draws_the_host_samplers_tokens() {
    use runner::config::GenerationParams;
    use runner::sampler::{self, RecordRng};
    let dev = gpu();
    let mut rng = Lcg(61);
    let (rows, v) = (48usize, 32000usize);
    // Peaked rows: a few likely tokens over a long tail, some -inf and NaN.
    let mut logits: Vec<f32> = (0..rows * v)
        .map(|_| {
            let x = rng.next();
            if x > 0.998 {
                9.0 + 3.0 * x
            } else {
                3.0 * x
            }
        })
        .collect();
    for r in 0..rows {
        logits[r * v + 17] = f32::NEG_INFINITY;
        logits[r * v + 18] = f32::NAN;
    }
    let up = |x: &[f32]| Tensor::from_vec(x.to_vec(), (rows, v), &dev).unwrap();
    // Repetition penalty: exactly the host's, each listed token once.
    let seen: Vec<Vec<u32>> = (0..rows)
        .map(|r| {
            (0..40)
                .map(|j| ((r * 7919 + j * 104729) % v) as u32)
                .chain([5, 5, 5])
                .collect()
        })
        .collect();
    let pens: Vec<f32> = (0..rows).map(|r| 1.0 + 0.05 * (r % 5) as f32).collect();
    let t = up(&logits);
    cuda::penalize_rows(&t, &seen, &pens).unwrap();
    let mut want = logits.clone();
    for r in 0..rows {
        sampler::apply_repetition_penalty(&mut want[r * v..(r + 1) * v], &seen[r], pens[r] as f64);
    }
    let got = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        got.iter()
            .zip(&want)
            .all(|(a, b)| a == b || (a.is_nan() && b.is_nan())),
        "penalty"
    );
    let params = |t: f32, top_p: f64| GenerationParams {
        temperature: t as f64,
        top_p,
        top_k: 0,
        ..GenerationParams::default()
    };
    let temps: Vec<f32> = (0..rows).map(|r| 0.5 + 0.05 * r as f32).collect();
    let t = up(&want);
    // Normalisers as the host computes them.
    for (r, (max, sum)) in cuda::row_norms(&t, &temps).unwrap().into_iter().enumerate() {
        let (hmax, hsum) = sampler::row_norm(&want[r * v..(r + 1) * v], temps[r]);
        assert_eq!(max, hmax, "row {r} max");
        assert!(
            (sum - hsum).abs() <= 1e-12 * hsum,
            "row {r} sum {sum} vs {hsum}"
        );
    }
    // The draw over the whole row: the host's token for the same uniform.
    let us: Vec<f64> = (0..rows)
        .map(|r| RecordRng::new(r as u64, "u").next_f64())
        .collect();
    let drawn = cuda::draw_rows(&t, &temps, &us).unwrap();
    for r in 0..rows {
        let row = &want[r * v..(r + 1) * v];
        let host = sampler::sample(
            &mut row.to_vec(),
            &[],
            &params(temps[r], 1.0),
            &mut RecordRng::new(r as u64, "u"),
        );
        assert_eq!(drawn[r], Some(host), "draw row {r}");
    }
    // Top-p from the device's 64 candidates and normaliser: the host's token.
    let cands = cuda::topk_rows(&t, &temps, 64).unwrap();
    let norms = cuda::row_norms(&t, &temps).unwrap();
    let mut fitted = 0;
    for r in 0..rows {
        let p = params(temps[r], 0.9);
        if !sampler::nucleus_fits(&cands[r], norms[r].1, 0.9) {
            continue;
        }
        fitted += 1;
        let row = &want[r * v..(r + 1) * v];
        let host = sampler::sample(
            &mut row.to_vec(),
            &[],
            &p,
            &mut RecordRng::new(r as u64, "p"),
        );
        let dev_tok = sampler::sample_nucleus(
            &cands[r],
            norms[r].1,
            &p,
            &mut RecordRng::new(r as u64, "p"),
        );
        assert_eq!(dev_tok, host, "nucleus row {r}");
    }
    assert!(
        fitted > rows / 2,
        "{fitted} of {rows} nuclei fitted 64 candidates"
    );
}

#[test]
fn the_device_draw_follows_the_softmax_over_100000_draws() {
    // Chi-square of 10^5 device draws of one 50-token row against the host
    // sampler's probabilities (49 degrees of freedom; 100 is p ~ 2e-5).
    let dev = gpu();
    let (n, v) = (100_000usize, 50usize);
    let row: Vec<f32> = (0..v).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
    let t = 0.9f32;
    let rows = Tensor::from_vec(row.repeat(n), (n, v), &dev).unwrap();
    let mut rng = runner::sampler::RecordRng::new(5, "chi");
    let us: Vec<f64> = (0..n).map(|_| rng.next_f64()).collect();
    let drawn = cuda::draw_rows(&rows, &vec![t; n], &us).unwrap();
    let mut counts = vec![0f64; v];
    for d in drawn {
        counts[d.expect("finite row") as usize] += 1.0;
    }
    let w: Vec<f64> = row.iter().map(|x| ((x / t) as f64).exp()).collect();
    let z: f64 = w.iter().sum();
    let chi: f64 = counts
        .iter()
        .zip(&w)
        .map(|(c, wi)| {
            let e = n as f64 * wi / z;
            (c - e).powi(2) / e
        })
        .sum();
    assert!(chi < 100.0, "chi-square {chi} over {v} tokens");
}

#[test]
fn seeded_sampling_on_the_gpu_is_reproducible() {
    let fx = crate::common::fixtures();
    // A quantized fixture among those this run checks (TEST_MODELS).
    let model = crate::common::models()
        .into_iter()
        .find(|m| m.contains("gptq"))
        .expect("TEST_MODELS names a GPTQ fixture");
    let tmp = tempfile::tempdir().unwrap();
    let mut s = String::new();
    for i in 0..6 {
        s.push_str(
            &serde_json::json!({"id": format!("s{i}"), "prompt": format!("Tell me about {i}.")})
                .to_string(),
        );
        s.push('\n');
    }
    std::fs::write(tmp.path().join("p.jsonl"), s).unwrap();
    // Each device route: top-k candidates; top-p from the candidates and the
    // row's normaliser, after the repetition penalty; the whole-row draw.
    for (n, sampling) in [
        "top_k = 20\ntop_p = 0.95",
        "top_k = 0\ntop_p = 0.9\nrepetition_penalty = 1.2",
        "top_k = 0\ntop_p = 1.0",
    ]
    .iter()
    .enumerate()
    {
        seeded_twice(tmp.path(), &fx.join(model), n, sampling);
    }
}

/// Runs the job twice with `sampling` and checks both give the same tokens.
fn seeded_twice(dir: &std::path::Path, model: &std::path::Path, n: usize, sampling: &str) {
    let mut outs = Vec::new();
    for out in [format!("a{n}"), format!("b{n}")] {
        let job = crate::common::write_job(
            dir,
            model,
            "p.jsonl",
            &format!(
                "[generation]\nmax_new_tokens = 12\ntemperature = 0.8\n{sampling}\nseed = 7\n\n[output]\npath = \"{out}\"\ninclude_token_ids = true\n\n[engine]\ndevice = \"cuda\"\n"
            ),
        );
        let run = crate::common::runner(dir, &["submit", job.to_str().unwrap()], &[]);
        assert!(run.ok, "{}", run.stderr);
        let mut rows = crate::common::rows(&dir.join(&out));
        rows.sort_by(|x, y| x.id.cmp(&y.id));
        // 12 tokens, or fewer where EOS was drawn.
        assert!(rows
            .iter()
            .all(|r| r.status == "ok" && (1..=12).contains(&r.token_ids.len())));
        outs.push(rows.into_iter().map(|r| r.token_ids).collect::<Vec<_>>());
    }
    assert_eq!(outs[0], outs[1], "same seed, same samples ({sampling})");
}

#[test]
fn flash_prefill_matches_a_float64_reference() {
    let dev = gpu();
    let mut rng = Lcg(77);
    let (nh, nkv) = (8usize, 2usize);
    for (d, window) in [(16usize, 0usize), (16, 40), (64, 0), (128, 0), (128, 50)] {
        // Two sequences' chunks: a first chunk of 70 queries (two tiles,
        // the second ragged) and a later chunk of 33 queries after 100
        // cached positions; the cache rows are scattered.
        let chunks = [(0usize, 70usize), (100, 33)];
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
        let (tiles, ntiles) = cuda::prefill_tiles(&pc, &dev).unwrap();
        let out = Tensor::zeros((t, nh * d), DType::F16, &dev).unwrap();
        cuda::flash_prefill(
            &qt,
            &kct,
            &vct,
            &keyt,
            (&tiles, ntiles),
            &out,
            &cuda::PrefillShape {
                heads: nh,
                kv_heads: nkv,
                head_dim: d,
                window,
            },
        )
        .unwrap();
        let got = host(&out);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0f64, f64::max);
        assert!(
            got.iter().all(|v| v.is_finite()) && worst < 4e-3,
            "flash prefill d {d} window {window}: max abs err {worst}"
        );
    }
}
