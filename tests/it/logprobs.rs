//! `output.logprobs` and `output.prompt_logprobs` on the fixtures against
//! the reference's own logits (f32 CPU against the exact dequantized fp32
//! forward: 2e-3, the fixture tolerance): at every prefix of every
//! reference sequence, the greedy token's log-probability and the top 5
//! are the reference's log-softmax. Prompt log-probabilities: a token
//! appended to each whole sequence against the reference's full last-row
//! logits, and every position against the full-sequence forward (itself
//! checked against the reference in `reference_logits`).

use crate::common::{fixtures, json, reference_path};
use crate::reference_logits::{f32s, i64s};
use runner::input::InputRecord;
use runner::output::OutputRow;
use safetensors::SafeTensors;

/// Where and how a check runs: the engine's device and dtype, the
/// reference path's tolerance and the top1-top2 margin above which the
/// greedy token must be the reference's.
pub struct Setting {
    pub device: &'static str,
    pub f16: bool,
    pub tol: f32,
    pub margin: f32,
}

/// f32 on the CPU against the exact dequantized fp32 forward.
const CPU_F32: Setting = Setting {
    device: "cpu",
    f16: false,
    tol: 2e-3,
    margin: 1e-2,
};

fn engine(dir: &std::path::Path, model: &str, s: &Setting) -> runner::engine::Engine {
    std::fs::write(dir.join("in.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"{}\"\n[input]\npath = \"in.jsonl\"\n[generation]\nmax_new_tokens = 1\nignore_eos = true\n[output]\nlogprobs = 5\nprompt_logprobs = true\n[engine]\ndevice = \"{}\"\n",
            fixtures().join(model).display(),
            if s.f16 { "f16" } else { "f32" },
            s.device
        ),
    )
    .unwrap();
    engine_of(&job)
}

/// The engine of the job file `job`, offline.
pub fn engine_of(job: &std::path::Path) -> runner::engine::Engine {
    let spec = runner::config::load(job, &Default::default()).unwrap();
    let hub = runner::model::HubSettings {
        cache_dir: None,
        offline: true,
        token: None,
    };
    runner::engine::Engine::load(&spec, &hub).unwrap().0
}

fn record(id: String, row: u64) -> InputRecord {
    let params = runner::config::GenerationParams {
        max_new_tokens: 1,
        ignore_eos: true,
        ..Default::default()
    };
    InputRecord::for_tokens(row, id, params)
}

#[test]
fn logprobs_match_the_reference_log_softmax() {
    check(&CPU_F32);
}

/// Runs every prefix of every reference sequence through an engine of
/// setting `s` and checks its log-probabilities (see the module).
pub fn check(s: &Setting) {
    let fx = fixtures();
    let seqs = json(&fx.join("references/sequences.json"));
    let seqs = seqs["sequences"].as_object().unwrap();
    let mut checked = (0, 0, 0);
    for model in crate::common::models() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = engine(tmp.path(), model, s);
        let path = reference_path(model, s.f16);
        let bytes =
            std::fs::read(fx.join(format!("references/{model}/{path}.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        // Every prefix of every sequence, as a token prompt.
        let mut items = Vec::new();
        let mut what = Vec::new();
        for (name, ids) in seqs {
            let ids = crate::common::token_ids(ids);
            for k in 1..=ids.len() {
                what.push((name.clone(), ids.clone(), k));
                items.push((
                    record(format!("{name}-{k}"), items.len() as u64),
                    ids[..k].to_vec(),
                ));
            }
        }
        // Each whole sequence with a token appended: its prompt
        // log-probability is the reference's full last row's log-softmax.
        let mut appended = Vec::new();
        for (name, ids) in seqs {
            let ids = crate::common::token_ids(ids);
            for x in [1000u32, 31999, 13] {
                let mut all = ids.clone();
                all.push(x);
                appended.push((name.clone(), ids.clone(), x));
                items.push((record(format!("{name}+{x}"), items.len() as u64), all));
            }
        }
        let mut rows: Vec<OutputRow> = Vec::new();
        engine.run_tokens(items, &mut rows).unwrap();
        rows.sort_by_key(|r| r.input_row);
        assert_eq!(rows.len(), what.len() + appended.len());
        // The full-sequence forward of the same model, dtype and device.
        let dtype = if s.f16 {
            candle_core::DType::F16
        } else {
            candle_core::DType::F32
        };
        let full_model = runner::model::load(
            &fx.join(model),
            &runner::model::LoadOptions::new(dtype, engine.model().device()),
        )
        .unwrap();
        for (r, (name, ids, x)) in rows[what.len()..].iter().zip(&appended) {
            let t = ids.len();
            let pl = r
                .prompt_logprobs
                .as_ref()
                .expect("prompt logprobs asked for");
            let last = f32s(&st, &format!("{name}.logits_last"));
            let lse = f32s(&st, &format!("{name}.logsumexp"));
            let want = last[*x as usize] - lse[t - 1];
            let got = pl[t].expect("the appended token is scored");
            assert!(
                (got - want).abs() <= s.tol,
                "{model} {name}+{x}: {got} vs {want}"
            );
            checked.1 += 1;
            let mut all = ids.clone();
            all.push(*x);
            let full = full_model.logits_full(&all).unwrap();
            let full = full.to_dtype(candle_core::DType::F32).unwrap();
            let full = full.to_vec2::<f32>().unwrap();
            assert_eq!(pl[0], None);
            for i in 1..all.len() {
                let want = runner::scoring::token_logprob(&full[i - 1], all[i]) as f32;
                let got = pl[i].expect("every prompt token but the first");
                assert!(
                    (got - want).abs() <= s.tol,
                    "{model} {name}+{x} prompt token {i}"
                );
                checked.1 += 1;
            }
        }
        for (r, (name, ids, k)) in rows.iter().zip(&what) {
            let (top_ids, top_vals) = (
                i64s(&st, &format!("{name}.topk_ids")),
                f32s(&st, &format!("{name}.topk_vals")),
            );
            let lse = f32s(&st, &format!("{name}.logsumexp"));
            let p = k - 1; // the position whose logits chose the token
            let reference = |tok: u32| {
                (0..8)
                    .find(|&j| top_ids[p * 8 + j] as u32 == tok)
                    .map(|j| top_vals[p * 8 + j] - lse[p])
            };
            let lp = r.logprobs.as_ref().expect("logprobs asked for");
            let tok = r.completion_token_ids.first().copied();
            let tok = tok.unwrap_or_else(|| lp.top[0][0].0);
            let margin = top_vals[p * 8] - top_vals[p * 8 + 1];
            if margin > s.margin {
                assert_eq!(
                    tok as i64,
                    top_ids[p * 8],
                    "{model} {name}[..{k}] greedy token"
                );
            }
            let want = reference(tok).expect("the greedy token is in the reference top 8");
            assert!(
                (lp.chosen[0] - want).abs() <= s.tol,
                "{model} {name}[..{k}]: {} vs {want}",
                lp.chosen[0]
            );
            assert_eq!(lp.top[0][0].0, tok, "top-1 is the greedy token");
            assert_eq!(lp.top[0].len(), 5);
            for &(t, l) in &lp.top[0] {
                let want = reference(t).expect("our top 5 are in the reference top 8");
                assert!((l - want).abs() <= s.tol, "{model} {name}[..{k}] token {t}");
                checked.0 += 1;
            }
            let _ = ids;
            checked.2 += 1;
        }
    }
    eprintln!(
        "checked {} top entries, {} prompt tokens over {} prompts",
        checked.0, checked.1, checked.2
    );
    assert!(checked.1 > 100 && checked.2 > 100);
}
