//! The OpenAI Batch format both ways: request lines in
//! (`input.format = "openai_batch"`), `runner export --format
//! openai_batch` out, every output line parsed by the official `openai`
//! Python package's types.

use crate::common::{fixtures, rows, runner, ALL_MODELS};

const REQUESTS: &[&str] = &[
    r#"{"custom_id": "plain", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "any", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0}}"#,
    r#"{"custom_id": "sampled", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "any", "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}], "max_completion_tokens": 8, "temperature": 0.8, "seed": 3, "n": 2, "stop": ["."], "logprobs": true, "top_logprobs": 2}}"#,
    r#"{"custom_id": "json", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "any", "messages": [{"role": "user", "content": "Pick one."}], "max_tokens": 24, "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "strict": true, "schema": {"type": "object", "properties": {"pick": {"enum": ["a", "b"]}}, "required": ["pick"], "additionalProperties": false}}}}}"#,
    r#"{"custom_id": "tools", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "any", "messages": [{"role": "user", "content": "x"}], "tools": []}}"#,
];

#[test]
fn openai_batch_requests_run_and_export_lines_the_openai_package_parses() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("batch.jsonl"), REQUESTS.join("\n") + "\n").unwrap();
    std::fs::write(
        d.join("job.toml"),
        format!(
            "[model]\nid = \"{}\"\ndtype = \"f32\"\n\n[input]\npath = \"batch.jsonl\"\nformat = \"openai_batch\"\n\n[output]\npath = \"out\"\n",
            fixtures().join(ALL_MODELS[1]).display()
        ),
    )
    .unwrap();
    let run = runner(d, &["submit", "job.toml"], &[]);
    assert!(run.ok, "{}", run.stderr);
    let out = rows(&d.join("out"));
    assert_eq!(out.len(), 5, "plain, two samples, json, tools");
    let tools = out.iter().find(|r| r.id == "tools").unwrap();
    let e = tools.error.as_deref().unwrap();
    assert!(
        e.contains("record tools: body.tools is not supported"),
        "{e}"
    );
    // To a file, and to standard output: the same lines.
    let exp = runner(
        d,
        &[
            "export",
            "out",
            "--format",
            "openai_batch",
            "--output",
            "results.jsonl",
        ],
        &[],
    );
    assert!(exp.ok, "{}", exp.stderr);
    let file = std::fs::read_to_string(d.join("results.jsonl")).unwrap();
    let stdout = runner(d, &["export", "out", "--format", "openai_batch"], &[]);
    assert!(stdout.ok, "{}", stdout.stderr);
    assert_eq!(stdout.stdout, file);
    let lines: Vec<serde_json::Value> = file
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["plain", "sampled", "json", "tools"],
        "one line per request, input order"
    );
    let script = r#"
import json
from openai.types.chat import ChatCompletion
n = 0
for line in open("results.jsonl"):
    d = json.loads(line)
    assert set(d) == {"id", "custom_id", "response", "error"}, d.keys()
    if d["response"] is None:
        assert d["custom_id"] == "tools" and "body.tools" in d["error"]["message"]
        continue
    assert d["response"]["status_code"] == 200 and d["error"] is None
    c = ChatCompletion.model_validate(d["response"]["body"])
    assert c.object == "chat.completion"
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    if d["custom_id"] == "sampled":
        assert [x.index for x in c.choices] == [0, 1]
        for ch in c.choices:
            assert len(ch.logprobs.content) >= 1
            for t in ch.logprobs.content:
                assert len(t.top_logprobs) == 2 and t.logprob <= 0
    if d["custom_id"] == "json":
        assert json.loads(c.choices[0].message.content)["pick"] in ("a", "b")
    n += 1
print("parsed", n)
"#;
    let (python, path) = crate::common::python_with("openai");
    let mut cmd = std::process::Command::new(python);
    cmd.current_dir(d).args(["-c", script]);
    if let Some(p) = path {
        cmd.env("PYTHONPATH", p);
    }
    let res = cmd.output().unwrap();
    let said = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success() && said.contains("parsed 3"),
        "{said}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
}
