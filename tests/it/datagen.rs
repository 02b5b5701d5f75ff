//! Dataset generation (issue 13) through the real CLI.

use crate::common::{error_line, fixtures, rows, runner, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `input` and a job over it with `extra` job text; runs it.
fn job(
    dir: &Path,
    name: &str,
    input: &str,
    extra: &str,
) -> (crate::common::Run, std::path::PathBuf) {
    std::fs::write(dir.join(format!("{name}.jsonl")), input).unwrap();
    let out = dir.join(format!("out-{name}"));
    let job = dir.join(format!("{name}.toml"));
    std::fs::write(
        &job,
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f32\"\n\n[input]\npath = \"{name}.jsonl\"\n{extra}\n[generation]\nmax_new_tokens = 4\n\n[output]\npath = \"{}\"\ninclude_token_ids = true\n",
            fixtures().join(ALL_MODELS[1]).display(),
            out.display()
        ),
    )
    .unwrap();
    (runner(dir, &["submit", job.to_str().unwrap()], &[]), out)
}

fn by_id(out: &Path) -> BTreeMap<String, Row> {
    rows(out).into_iter().map(|r| (r.id.clone(), r)).collect()
}

#[test]
fn a_template_over_columns_gives_the_prompt_it_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let records = [
        serde_json::json!({"id": "a", "question": "2+2?", "choices": ["3", "4"], "topic": "math"}),
        serde_json::json!({"id": "b", "question": "Capital of France?", "choices": ["Paris", "Rome"], "topic": "geo"}),
        serde_json::json!({"id": "c", "question": null, "choices": [], "topic": "none"}),
    ];
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    let template = "[input]\ntemplate = '''Q: {{ question }}\nChoices: {{ choices | join(\", \") }}\nTopic: {{ topic | upper }}'''\n";
    // Written in the job text above, the template sits inside the [input] table.
    let (run, out) = job(
        tmp.path(),
        "templ",
        &input,
        &template.replace("[input]\n", ""),
    );
    assert!(run.ok, "{}", run.stderr);
    let templ = by_id(&out);
    // The same prompts, written out by hand.
    let plain = [
        serde_json::json!({"id": "a", "prompt": "Q: 2+2?\nChoices: 3, 4\nTopic: MATH"}),
        serde_json::json!({"id": "b", "prompt": "Q: Capital of France?\nChoices: Paris, Rome\nTopic: GEO"}),
    ];
    let input: String = plain.iter().map(|r| format!("{r}\n")).collect();
    let (run, out) = job(tmp.path(), "plain", &input, "");
    assert!(run.ok, "{}", run.stderr);
    let plain = by_id(&out);
    for id in ["a", "b"] {
        assert_eq!(
            (templ[id].prompt_tokens, &templ[id].token_ids),
            (plain[id].prompt_tokens, &plain[id].token_ids),
            "record {id}"
        );
    }
    // A null cell is that record's error row.
    assert_eq!(templ["c"].status, "error");
    let e = templ["c"].error.as_deref().unwrap();
    assert!(e.contains("`question`") && e.contains("null"), "{e}");
}

#[test]
fn a_template_column_the_input_lacks_fails_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, out) = job(
        tmp.path(),
        "lacks",
        "{\"id\": 1, \"question\": \"hi\"}\n",
        "template = \"{{ question }} ({{ topic }})\"\n",
    );
    let e = error_line(&run);
    assert_eq!(run.code, Some(2), "{e}");
    assert!(e.contains("input.template reads column `topic`"), "{e}");
    assert!(!run.stderr.contains("model loaded"), "{}", run.stderr);
    assert!(!out.exists());
}
