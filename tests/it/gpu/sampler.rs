//! The device sampler: top-k candidates, the repetition penalty, the row
//! normaliser and the whole-row draw against the host sampler, a
//! chi-square of device draws, and seeded jobs through every route.

use super::{gpu, Lcg};
use candle_core::Tensor;
use runner::cuda;

#[test]
fn gpu_topk_matches_the_host_samplers_order() {
    let dev = gpu();
    let mut rng = Lcg(51);
    // k up to the kernel's 1,024; a row with fewer finite values than k;
    // rows of few distinct values (ties at the k-th value, taken by id);
    // rows of one value (a tie group wider than k across every thread); a
    // vocabulary of 131,072; rows with no finite value at all; logits whose
    // v / t overflows to infinity (a candidate, as on the host).
    #[derive(Clone, Copy, PartialEq)]
    enum Fill {
        Random,
        Quarters,
        Equal,
        NoneFinite,
        Huge,
    }
    let cases = [
        (5usize, 32002usize, 64usize, Fill::Random),
        (3, 32000, 1024, Fill::Random),
        (3, 32000, 300, Fill::Quarters),
        (3, 1000, 7, Fill::Random),
        (4, 300, 1, Fill::Random),
        (2, 40, 64, Fill::Quarters),
        (2, 32000, 300, Fill::Equal),
        (1, 131072, 64, Fill::Random),
        (2, 100, 50, Fill::NoneFinite),
        (2, 5000, 40, Fill::Huge),
    ];
    for (rows, v, k, fill) in cases {
        let mut logits: Vec<f32> = (0..rows * v)
            .map(|_| {
                let x = rng.next() * 6.0;
                match fill {
                    Fill::Random => x,
                    Fill::Quarters => (x * 4.0).round() / 4.0,
                    Fill::Equal => 1.5,
                    Fill::NoneFinite => f32::NEG_INFINITY,
                    Fill::Huge => x * 1e38,
                }
            })
            .collect();
        // Ties, infinities and NaN.
        for r in (0..rows).filter(|_| fill != Fill::NoneFinite) {
            logits[r * v + 3] = 50.0;
            logits[r * v + 9] = 50.0;
            logits[r * v + 11] = f32::NAN;
            logits[r * v + 12] = f32::INFINITY;
            logits[r * v + 13] = f32::NEG_INFINITY;
            if fill == Fill::Quarters {
                // The host's total order puts -0.0 below 0.0.
                logits[r * v + 20] = -0.0;
                logits[r * v + 21] = 0.0;
                logits[r * v + 22] = -0.0;
            }
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
            assert_eq!(got[r].len(), cand.len(), "rows {rows} v {v} k {k} row {r}");
            for (g, c) in got[r].iter().zip(&cand) {
                // Bit for bit: -0.0 and 0.0 are different values here.
                assert_eq!(
                    (g.0, g.1.to_bits()),
                    (c.0, c.1.to_bits()),
                    "rows {rows} v {v} k {k} row {r}"
                );
            }
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
    // Temperatures 0.5-1.2: peaked enough that most nuclei fit 64 candidates.
    let temps: Vec<f32> = (0..rows).map(|r| 0.5 + 0.015 * r as f32).collect();
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
    let tmp = tempfile::tempdir().unwrap();
    let model = six_prompts(tmp.path(), "Tell me about");
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
        seeded_twice(tmp.path(), &model, n, sampling);
    }
}

/// Writes `dir`/p.jsonl, six prompts "`text` i." (ids s0..s5), and returns
/// the GPTQ fixture among those this run checks (TEST_MODELS).
fn six_prompts(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let model = crate::common::models()
        .into_iter()
        .find(|m| m.contains("gptq"))
        .expect("TEST_MODELS names a GPTQ fixture");
    let lines: String = (0..6)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("s{i}"), "prompt": format!("{text} {i}.")})
            )
        })
        .collect();
    std::fs::write(dir.join("p.jsonl"), lines).unwrap();
    crate::common::fixtures().join(model)
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
fn min_new_tokens_masks_the_stop_tokens_on_every_device_route() {
    // Half the vocabulary as stop tokens: unmasked, nearly every record
    // would end within its first tokens. With min_new_tokens = 12 the rows
    // are picked on the device from copies with those tokens at -inf
    // (argmax, top-k, top-p, whole-row draw): no stop token among the
    // first 12, and no record shorter. (Which route a row takes is the
    // unit test `routes_follow_the_settings...`; a top-p nucleus wider than
    // the device's candidates still falls back to the host, which masks
    // the same copy.)
    let dir = tempfile::tempdir().unwrap();
    let model = six_prompts(dir.path(), "Count to");
    let stops: Vec<u32> = (0..16000).collect();
    let list = format!("{stops:?}");
    for (n, sampling) in [
        "temperature = 0.0",
        "temperature = 0.9\ntop_k = 20",
        "temperature = 0.9\ntop_k = 0\ntop_p = 0.9",
        "temperature = 0.9\ntop_k = 0\ntop_p = 1.0",
    ]
    .iter()
    .enumerate()
    {
        let out = format!("min{n}");
        let job = crate::common::write_job(
            dir.path(),
            &model,
            "p.jsonl",
            &format!(
                "[generation]\nmax_new_tokens = 14\nmin_new_tokens = 12\n{sampling}\nseed = 3\nstop_token_ids = {list}\n\n[output]\npath = \"{out}\"\ninclude_token_ids = true\n\n[engine]\ndevice = \"cuda\"\n"
            ),
        );
        let run = crate::common::runner(dir.path(), &["submit", job.to_str().unwrap()], &[]);
        assert!(run.ok, "{sampling}: {}", run.stderr);
        let rows = crate::common::rows(&dir.path().join(&out));
        assert_eq!(rows.len(), 6);
        for r in &rows {
            assert!(
                r.status == "ok" && r.token_ids.len() >= 12,
                "{sampling}: {r:?}"
            );
            assert!(
                r.token_ids[..12].iter().all(|&t| t >= 16000),
                "{sampling}: a stop token before min_new_tokens in {:?}",
                r.token_ids
            );
        }
    }
}
