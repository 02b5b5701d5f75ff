//! Logits of the CPU path against GPTQModel's (and HF's) own, on every
//! reference sequence, at every position: f32 against the exact dequantized
//! fp32 forward (max |diff| <= 2e-3), f16 against GPTQModel's fp16 inference
//! (<= 0.05), the tolerances the fixture README states.

use crate::common::{fixtures, json, reference_path, ALL_MODELS};
use candle_core::{DType, Device};
use safetensors::SafeTensors;

pub(crate) fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

pub(crate) fn i64s(st: &SafeTensors, name: &str) -> Vec<i64> {
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Checks one model's logits on `device` against its reference.
pub fn check_model(model: &str, f16: bool, device: &Device) {
    let fx = fixtures();
    let (dtype, tol, argmax_margin) = if f16 {
        (DType::F16, 0.05f32, 0.1f32)
    } else {
        (DType::F32, 2e-3, 1e-2)
    };
    let m = runner::model::load(
        &fx.join(model),
        &runner::model::LoadOptions::new(dtype, device),
    )
    .unwrap();
    let path = reference_path(model, f16);
    let bytes = std::fs::read(fx.join(format!("references/{model}/{path}.safetensors"))).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let seqs = json(&fx.join("references/sequences.json"));
    let seqs = seqs["sequences"].as_object().unwrap();
    assert_eq!(seqs.len(), 5);
    for (name, ids) in seqs {
        let ids: Vec<u32> = crate::common::token_ids(ids);
        let want_ids: Vec<u32> = i64s(&st, &format!("{name}.input_ids"))
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(ids, want_ids, "{model} {name}: input ids");
        let logits = m.logits_full(&ids).unwrap().to_vec2::<f32>().unwrap();
        let t_len = ids.len();
        let vocab = logits[0].len();
        let last = f32s(&st, &format!("{name}.logits_last"));
        assert_eq!(last.len(), vocab);
        let d = last
            .iter()
            .zip(&logits[t_len - 1])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            d <= tol,
            "{model}/{path} {name}: last-position logits differ by {d} > {tol}"
        );
        let top_ids = i64s(&st, &format!("{name}.topk_ids"));
        let top_vals = f32s(&st, &format!("{name}.topk_vals"));
        let lse = f32s(&st, &format!("{name}.logsumexp"));
        let argmax = i64s(&st, &format!("{name}.argmax"));
        let mut worst = 0f32;
        for t in 0..t_len {
            let row = &logits[t];
            for j in 0..8 {
                let got = row[top_ids[t * 8 + j] as usize];
                worst = worst.max((got - top_vals[t * 8 + j]).abs());
            }
            let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let our_lse = mx + row.iter().map(|v| (v - mx).exp()).sum::<f32>().ln();
            worst = worst.max((our_lse - lse[t]).abs());
            if top_vals[t * 8] - top_vals[t * 8 + 1] > argmax_margin {
                assert_eq!(
                    runner::sampler::argmax(row) as i64,
                    argmax[t],
                    "{model}/{path} {name}: argmax at position {t}"
                );
            }
        }
        assert!(
            worst <= tol,
            "{model}/{path} {name}: top-8 logits / logsumexp differ by {worst} > {tol}"
        );
    }
}

#[test]
fn f32_logits_match_exact_dequantized_reference() {
    for m in crate::common::models() {
        check_model(m, false, &Device::Cpu);
    }
}

#[test]
fn f16_logits_match_gptqmodel_fp16_inference() {
    for m in crate::common::models() {
        check_model(m, true, &Device::Cpu);
    }
}

#[test]
fn chat_rendering_and_tokenization_match_reference_ids() {
    let fx = fixtures();
    let seqs = json(&fx.join("references/sequences.json"));
    let p = runner::prompt::Prompter::load(&fx.join(ALL_MODELS[1]), &[32000]).unwrap();
    assert_eq!(p.stop_ids(), &[32000]);
    for (name, g) in seqs["generation_prompts"].as_object().unwrap() {
        let messages: Vec<runner::prompt::Message> =
            serde_json::from_value(g["messages"].clone()).unwrap();
        let ids: Vec<u32> = crate::common::token_ids(&g["ids"]);
        let text = p.render(&messages).unwrap();
        assert_eq!(p.encode(&text).unwrap(), ids, "{name}");
    }
    let text = p
        .render(
            &serde_json::from_value::<Vec<_>>(
                seqs["generation_prompts"]["orca_system_hello"]["messages"].clone(),
            )
            .unwrap(),
        )
        .unwrap();
    assert_eq!(text, seqs["chatml_text"].as_str().unwrap());
}

/// Loglikelihood scoring against the references: the log-softmax of a
/// continuation token after a reference sequence is the reference's
/// full-vocabulary last logits minus its logsumexp; a continuation of
/// several tokens sums such terms where the reference's top-8 holds them.
#[test]
fn loglikelihood_matches_reference_log_softmax() {
    let fx = fixtures();
    let seqs = json(&fx.join("references/sequences.json"));
    let mut checked = 0;
    for model in crate::common::models() {
        let m = runner::model::load(
            &fx.join(model),
            &runner::model::LoadOptions::new(DType::F32, &Device::Cpu),
        )
        .unwrap();
        let path = reference_path(model, false);
        let bytes =
            std::fs::read(fx.join(format!("references/{model}/{path}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, ids) in seqs["sequences"].as_object().unwrap() {
            let ids: Vec<u32> = crate::common::token_ids(ids);
            let t = ids.len();
            let last = f32s(&st, &format!("{name}.logits_last"));
            let lse = f32s(&st, &format!("{name}.logsumexp"));
            let top_ids = i64s(&st, &format!("{name}.topk_ids"));
            let top_vals = f32s(&st, &format!("{name}.topk_vals"));
            // One-token continuations after the whole sequence.
            for x in [
                top_ids[(t - 1) * 8] as u32,
                top_ids[(t - 1) * 8 + 5] as u32,
                1000,
                31999,
            ] {
                let mut all = ids.clone();
                all.push(x);
                let logits = m.logits_full(&all).unwrap().to_vec2::<f32>().unwrap();
                let (ll, n) = runner::scoring::loglikelihood(&logits, &all, t);
                let want = last[x as usize] as f64 - lse[t - 1] as f64;
                assert_eq!(n, 1);
                assert!(
                    (ll - want).abs() <= 4e-3,
                    "{model} {name} token {x}: {ll} vs {want}"
                );
                checked += 1;
            }
            // The sequence's own tail, from the first position whose every
            // next token is in the reference's top-8.
            let logits = m.logits_full(&ids).unwrap().to_vec2::<f32>().unwrap();
            let known = |i: usize| {
                (0..8)
                    .find(|&j| top_ids[(i - 1) * 8 + j] as u32 == ids[i])
                    .map(|j| top_vals[(i - 1) * 8 + j])
            };
            if let Some(k) = (1..t).find(|&k| (k..t).all(|i| known(i).is_some())) {
                let want: f64 = (k..t)
                    .map(|i| known(i).unwrap() as f64 - lse[i - 1] as f64)
                    .sum();
                let (ll, n) = runner::scoring::loglikelihood(&logits, &ids, k);
                assert_eq!(n, t - k);
                assert!(
                    (ll - want).abs() <= 4e-3 * n as f64,
                    "{model} {name} tail from {k}: {ll} vs {want}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} loglikelihood checks");
}

/// Dummy weights follow their seed on the CPU (as on CUDA): the same seed
/// gives the same logits, another seed others (engine v2 issue, item 8).
#[test]
fn cpu_dummy_weights_follow_the_seed() {
    let dir = fixtures().join("tiny-mistral-fp16");
    let (cfg, _) = runner::model::read_meta(&dir).unwrap();
    let opts = runner::model::LoadOptions::new(DType::F32, &Device::Cpu);
    let logits = |seed: u64| {
        let m = runner::model::Mistral::dummy(&cfg, None, &opts, seed).unwrap();
        m.logits_full(&[1, 2, 3]).unwrap().to_vec2::<f32>().unwrap()
    };
    let a = logits(7);
    assert_eq!(a, logits(7), "same seed, same weights");
    assert_ne!(a, logits(8), "another seed, other weights");
    assert!(a.iter().flatten().all(|v| v.is_finite()));
}
