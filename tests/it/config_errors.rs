//! Bad jobs and bad model directories: each gives one error line naming
//! the key, file or tensor at fault.

use crate::common::{error_line, fixtures, runner, write_job, ALL_MODELS};
use std::path::Path;

/// A copy of a fixture model directory whose files are symlinks, except
/// those the case rewrites.
fn model_copy(dst: &Path, src_name: &str, skip: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(fixtures().join(src_name)).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&name.as_str()) {
            std::os::unix::fs::symlink(&p, dst.join(&name)).unwrap();
        }
    }
}

fn with_prompts(dir: &Path) {
    std::fs::write(dir.join("p.jsonl"), "{\"id\": 1, \"prompt\": \"hi\"}\n").unwrap();
}

struct Case {
    name: &'static str,
    /// Prepares the temp dir; returns (verb, extra job text, extra args).
    setup: fn(&Path) -> (&'static str, String, Vec<String>),
    /// Substrings the error line must contain.
    expect: &'static [&'static str],
    /// Exit code: 2 for a bad job or input, 3 for a bad model, 64 usage.
    code: i32,
}

/// Copies a GPTQ fixture with one tensor (`down_proj.scales` of layer 1)
/// eight columns short.
fn write_bad_scales(d: &Path) {
    model_copy(&d.join("model"), ALL_MODELS[1], &["model.safetensors"]);
    let bytes = std::fs::read(fixtures().join(ALL_MODELS[1]).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bad = "model.layers.1.mlp.down_proj.scales";
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        if name == bad {
            shape[1] -= 8;
            data.truncate(shape.iter().product::<usize>() * 2);
        }
        owned.push((name, view.dtype(), shape, data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = owned
        .iter()
        .map(|(n, dt, s, d)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &d.join("model/model.safetensors")).unwrap();
}

fn run_case(c: &Case) {
    let tmp = tempfile::tempdir().unwrap();
    with_prompts(tmp.path());
    let (verb, extra, args) = (c.setup)(tmp.path());
    let model = if tmp.path().join("model").is_dir() {
        tmp.path().join("model")
    } else {
        fixtures().join(ALL_MODELS[1])
    };
    let job = write_job(
        tmp.path(),
        &model,
        "p.jsonl",
        &format!("[output]\npath = \"out\"\n{extra}"),
    );
    let mut argv = vec![verb.to_string(), job.to_str().unwrap().to_string()];
    argv.extend(args);
    let argv: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
    let run = runner(tmp.path(), &argv, &[]);
    let line = error_line(&run);
    assert_eq!(run.code, Some(c.code), "case {}: exit code", c.name);
    for e in c.expect {
        assert!(
            line.contains(e),
            "case {}: error line lacks `{e}`:\n{line}",
            c.name
        );
    }
}

#[test]
fn bad_configs_and_models_name_the_culprit() {
    let cases = [
        Case {
            name: "unknown key",
            setup: |_| ("validate", "[engine]\nmax_num_seq = 4\n".into(), vec![]),
            expect: &[
                "unknown field: found `max_num_seq`",
                "engine.max_num_seq",
                "job.toml",
            ],
            code: 2,
        },
        Case {
            name: "wrong type",
            setup: |_| {
                (
                    "validate",
                    "[generation]\nmax_new_tokens = \"many\"\n".into(),
                    vec![],
                )
            },
            expect: &["generation.max_new_tokens", "job.toml", "string \"many\""],
            code: 2,
        },
        Case {
            name: "bad --set value",
            setup: |_| {
                (
                    "validate",
                    String::new(),
                    vec!["--set".into(), "generation.top_p=1.5".into()],
                )
            },
            expect: &["generation.top_p is 1.5, expected a value in (0, 1]"],
            code: 2,
        },
        Case {
            name: "unknown --set key",
            setup: |_| {
                (
                    "validate",
                    String::new(),
                    vec!["--set".into(), "engine.turbo=true".into()],
                )
            },
            expect: &["unknown field: found `turbo`", "--set engine.turbo=true"],
            code: 2,
        },
        Case {
            name: "missing input file",
            setup: |d| {
                std::fs::remove_file(d.join("p.jsonl")).unwrap();
                ("validate", String::new(), vec![])
            },
            expect: &["input file", "p.jsonl", "does not exist"],
            code: 2,
        },
        Case {
            name: "pickle-only checkpoint",
            setup: |d| {
                model_copy(&d.join("model"), ALL_MODELS[0], &["model.safetensors"]);
                std::fs::write(d.join("model/pytorch_model.bin"), b"not really").unwrap();
                ("submit", String::new(), vec![])
            },
            expect: &["pickle", "safetensors"],
            code: 3,
        },
        Case {
            name: "unknown quant method",
            setup: |d| {
                model_copy(
                    &d.join("model"),
                    ALL_MODELS[1],
                    &["config.json", "quantize_config.json"],
                );
                let mut cfg: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(fixtures().join(ALL_MODELS[1]).join("config.json"))
                        .unwrap(),
                )
                .unwrap();
                cfg["quantization_config"]["quant_method"] = "awq".into();
                std::fs::write(d.join("model/config.json"), cfg.to_string()).unwrap();
                ("submit", String::new(), vec![])
            },
            expect: &[
                "config.json",
                "quant_method is `awq`, only gptq is supported",
            ],
            code: 3,
        },
        Case {
            name: "tensor shape mismatch",
            setup: |d| {
                write_bad_scales(d);
                ("submit", String::new(), vec![])
            },
            expect: &[
                "tensor `model.layers.1.mlp.down_proj.scales`",
                "shape is [3, 120], expected [3, 128]",
            ],
            code: 3,
        },
        Case {
            name: "tensor shape mismatch found by validate",
            setup: |d| {
                write_bad_scales(d);
                ("validate", String::new(), vec![])
            },
            expect: &[
                "tensor `model.layers.1.mlp.down_proj.scales`",
                "shape is [3, 120], expected [3, 128]",
            ],
            code: 3,
        },
        Case {
            name: "not a mistral",
            setup: |d| {
                model_copy(&d.join("model"), ALL_MODELS[0], &["config.json"]);
                std::fs::write(d.join("model/config.json"), r#"{"model_type": "llama"}"#).unwrap();
                ("validate", String::new(), vec![])
            },
            expect: &["config.json", "model_type is `llama`, expected mistral"],
            code: 3,
        },
        Case {
            name: "missing tokenizer.json found by validate",
            setup: |d| {
                model_copy(&d.join("model"), ALL_MODELS[1], &["tokenizer.json"]);
                ("validate", String::new(), vec![])
            },
            expect: &["tokenizer.json is missing"],
            code: 3,
        },
        Case {
            name: "missing tokenizer.json",
            setup: |d| {
                model_copy(&d.join("model"), ALL_MODELS[1], &["tokenizer.json"]);
                ("submit", String::new(), vec![])
            },
            expect: &["tokenizer.json is missing"],
            code: 3,
        },
        Case {
            name: "command-line usage error",
            setup: |_| ("submit", String::new(), vec!["--bogus".into()]),
            expect: &["--bogus"],
            code: 64,
        },
    ];
    for c in &cases {
        run_case(c);
    }
}

#[test]
fn environment_overrides_name_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    with_prompts(tmp.path());
    let job = write_job(tmp.path(), &fixtures().join(ALL_MODELS[1]), "p.jsonl", "");
    let run = runner(
        tmp.path(),
        &["validate", job.to_str().unwrap()],
        &[("RUNNER_ENGINE__MAX_NUM_SEQS", "lots")],
    );
    let line = error_line(&run);
    assert!(
        line.contains("engine.max_num_seqs") && line.contains("RUNNER_ENGINE__MAX_NUM_SEQS"),
        "{line}"
    );
    // Layering: the variable beats the job file, --set beats the variable.
    let run = runner(
        tmp.path(),
        &[
            "validate",
            job.to_str().unwrap(),
            "--set",
            "engine.max_num_seqs=7",
        ],
        &[
            ("RUNNER_ENGINE__MAX_NUM_SEQS", "5"),
            ("RUNNER_GENERATION__SEED", "99"),
        ],
    );
    assert!(run.ok, "{}", run.stderr);
    let spec: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(spec["engine"]["max_num_seqs"], 7);
    assert_eq!(spec["generation"]["seed"], 99);
    assert_eq!(
        spec["generation"]["max_new_tokens"], 256,
        "default from configs/default.toml"
    );
}

/// Regression (new-user issue, item 2): GitHub Actions sets `RUNNER_OS`,
/// `RUNNER_ARCH`, `RUNNER_TEMP` and more on every job; they are not config.
/// A `RUNNER_<SECTION>__<KEY>` naming an unknown key is still an error.
#[test]
fn github_actions_runner_variables_are_not_config() {
    let tmp = tempfile::tempdir().unwrap();
    with_prompts(tmp.path());
    let job = write_job(tmp.path(), &fixtures().join(ALL_MODELS[1]), "p.jsonl", "");
    let actions = [
        ("RUNNER_OS", "Linux"),
        ("RUNNER_ARCH", "X64"),
        ("RUNNER_NAME", "GitHub Actions 2"),
        ("RUNNER_ENVIRONMENT", "github-hosted"),
        ("RUNNER_TEMP", "/home/runner/work/_temp"),
        ("RUNNER_TOOL_CACHE", "/opt/hostedtoolcache"),
        ("RUNNER_DEBUG", "1"),
        ("RUNNER_WORKSPACE", "/home/runner/work/runner"),
        ("RUNNER_TRACKING_ID", "github_0b1c2d3e"),
        ("RUNNER_PERFLOG", "/home/runner/perflog"),
    ];
    let run = runner(tmp.path(), &["validate", job.to_str().unwrap()], &actions);
    assert!(run.ok, "{}", run.stderr);
    let mut with_typo = actions.to_vec();
    with_typo.push(("RUNNER_ENGINE__TURBO", "1"));
    let run = runner(tmp.path(), &["validate", job.to_str().unwrap()], &with_typo);
    let line = error_line(&run);
    assert!(
        line.contains("turbo") && line.contains("RUNNER_ENGINE__TURBO"),
        "{line}"
    );
    assert_eq!(run.code, Some(2));
}

/// Regression (new-user issue, item 1): bf16 passed `validate` and then
/// died after loading (`unsupported dtype BF16 for op matmul`). It is
/// refused before any model work, by `validate` and `submit` alike.
#[test]
fn bf16_is_refused_before_loading() {
    let tmp = tempfile::tempdir().unwrap();
    with_prompts(tmp.path());
    let job = write_job(tmp.path(), &fixtures().join(ALL_MODELS[1]), "p.jsonl", "");
    for verb in ["validate", "submit"] {
        let run = runner(
            tmp.path(),
            &[verb, job.to_str().unwrap(), "--set", "model.dtype=bf16"],
            &[],
        );
        let line = error_line(&run);
        assert!(
            line.contains("model.dtype is bf16") && line.contains("f16"),
            "{verb}: {line}"
        );
        assert_eq!(run.code, Some(2), "{verb}");
        assert!(
            !run.stderr.contains("model loaded"),
            "{verb}: refused before loading"
        );
    }
}

/// `engine.prefill_attention`: `auto` by default; a batch-invariant job
/// (`gptq_kernel = "fused"`) resolves `auto` to the one wgmma kernel (the
/// per-forward choice would make a row's bits depend on its batch), and an
/// explicit choice stays as written; a misspelt value names the key.
#[test]
fn prefill_attention_auto_is_fixed_in_a_batch_invariant_job() {
    use runner::config::PrefillAttention as P;
    let dir = tempfile::tempdir().unwrap();
    with_prompts(dir.path());
    let model = fixtures().join(ALL_MODELS[1]);
    let resolve = |engine: &str| {
        let job = write_job(
            dir.path(),
            &model,
            "p.jsonl",
            &format!("[engine]\n{engine}"),
        );
        runner::config::load(&job, &Default::default()).map(|s| s.engine.prefill_attention)
    };
    assert_eq!(resolve("").unwrap(), P::Auto);
    assert_eq!(resolve("gptq_kernel = \"fused\"").unwrap(), P::Wgmma);
    assert_eq!(
        resolve("gptq_kernel = \"fused\"\nprefill_attention = \"mma\"").unwrap(),
        P::Mma
    );
    assert_eq!(resolve("prefill_attention = \"wgmma\"").unwrap(), P::Wgmma);
    let e = resolve("prefill_attention = \"flash\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("prefill_attention"), "{e}");
}
