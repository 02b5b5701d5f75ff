//! The recipes under `deploy/`: the Slurm array script (syntax, and a dry
//! run of every task's shard through the real binary) and the Kubernetes
//! Indexed Job (validated against the Kubernetes schemas).

use crate::common::{fixtures, python_with, write_job, ALL_MODELS};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn runner_bin() -> PathBuf {
    std::env::var_os("TEST_RUNNER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_runner").into())
}

#[test]
fn the_slurm_script_parses_and_its_tasks_cover_every_record_once() {
    let script = repo().join("deploy/slurm/runner-array.sbatch");
    let st = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(st.success(), "bash -n {}", script.display());

    let tmp = tempfile::tempdir().unwrap();
    let n = 50;
    let lines: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("q{i}"), "prompt": "hi"})
            )
        })
        .collect();
    std::fs::write(tmp.path().join("p.jsonl"), lines).unwrap();
    let job = write_job(tmp.path(), &fixtures().join(ALL_MODELS[1]), "p.jsonl", "");
    // The recipe's array (--array=0-3: task i is shard i), an array that
    // starts at 1 (--array=1-4: shard = task - 1), and a retry of tasks 1
    // and 3 of the first (--array=1,3, count 2, min 1) given SHARDS=4,
    // which must run shards 1 and 3 again.
    let task = |id: usize, env: &[(&str, &str)]| -> (usize, usize) {
        let mut c = Command::new("bash");
        c.arg(&script)
            .current_dir(tmp.path())
            .env("DRY_RUN", "1")
            .env("RUNNER", runner_bin())
            .env("JOB", &job)
            .env("SLURM_ARRAY_TASK_ID", id.to_string())
            .env("NO_COLOR", "1")
            .env("HF_HUB_OFFLINE", "1");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("shard "))
            .expect("a shard line");
        // "shard I/N: R records, ..."
        let (shard, rest) = line["shard ".len()..].split_once(": ").unwrap();
        let index = shard.split('/').next().unwrap().parse().unwrap();
        let records = rest.split(' ').next().unwrap().parse().unwrap();
        (index, records)
    };
    let array = [
        ("SLURM_ARRAY_TASK_MIN", "0"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    let got: Vec<(usize, usize)> = (0..4).map(|id| task(id, &array)).collect();
    let indices: Vec<usize> = got.iter().map(|g| g.0).collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    assert_eq!(got.iter().map(|g| g.1).sum::<usize>(), n, "{got:?}");
    let from_one = [
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    let shifted: Vec<(usize, usize)> = (1..=4).map(|id| task(id, &from_one)).collect();
    assert_eq!(shifted, got);
    let retry = [
        ("SLURM_ARRAY_TASK_MIN", "1"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
        ("SHARDS", "4"),
    ];
    assert_eq!(task(1, &retry), got[1]);
    assert_eq!(task(3, &retry), got[3]);
}

fn validate_k8s(py: &Path, path: Option<&Path>, manifest: &Path) -> std::process::Output {
    let code = r#"
import sys, yaml, kubernetes_validate
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    kubernetes_validate.validate(d, "1.33.0", strict=True)
job = next(d for d in docs if d["kind"] == "Job")
spec = job["spec"]
cmd = spec["template"]["spec"]["containers"][0]["command"]
assert spec["completionMode"] == "Indexed", spec
assert "--shard" in cmd and cmd[cmd.index("--shard") + 1] == "auto", cmd
assert int(cmd[cmd.index("--shard-count") + 1]) == spec["completions"], (cmd, spec["completions"])
assert spec["backoffLimitPerIndex"] >= 1
print("ok", len(docs))
"#;
    let mut c = Command::new(py);
    c.arg("-c").arg(code).arg(manifest);
    if let Some(p) = path {
        c.env("PYTHONPATH", p);
    }
    c.output().unwrap()
}

#[test]
fn the_kubernetes_indexed_job_is_valid_and_its_shard_count_matches_its_completions() {
    let manifest = repo().join("deploy/kubernetes/runner-indexed-job.yaml");
    let (py, path) = python_with("kubernetes_validate");
    let out = validate_k8s(&py, path.as_deref(), &manifest);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ok 2"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The check rejects what it should: a field the schema does not know.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &bad,
        text.replace(
            "completionMode: Indexed",
            "completionMode: Indexed\n  completionsMode: Indexed",
        ),
    )
    .unwrap();
    assert!(!validate_k8s(&py, path.as_deref(), &bad).status.success());
}
