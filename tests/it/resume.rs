//! Never losing a record: kill -9 at random moments and resume, SIGTERM and
//! resume, the output lock, changed jobs, job-level input errors.

use crate::common::{error_line, fixtures, rows, runner, write_job, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const N: usize = 240;

fn write_prompts(dir: &Path) {
    let mut s = String::new();
    for i in 0..N {
        let filler = "rivers and mountains ".repeat(i % 7);
        s.push_str(
            &serde_json::json!({"id": format!("r{i:03}"), "prompt": format!("Write note {i} about {filler}")})
                .to_string(),
        );
        s.push('\n');
    }
    std::fs::write(dir.join("p.jsonl"), s).unwrap();
}

fn job(dir: &Path, out: &str) -> std::path::PathBuf {
    write_prompts(dir);
    write_job(
        dir,
        &fixtures().join(ALL_MODELS[1]),
        "p.jsonl",
        &format!(
            "[generation]\nmax_new_tokens = 24\n\n[output]\npath = \"{out}\"\ninclude_token_ids = true\nflush_every = 8\n\n[engine]\nmax_num_seqs = 16\n"
        ),
    )
}

pub(crate) fn spawn(dir: &Path, job: &Path, extra: &[&str]) -> Child {
    let bin = std::env::var_os("TEST_RUNNER_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_runner").into());
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir)
        .arg("submit")
        .arg(job)
        .args(extra)
        .args(["--set", "model.dtype=f32"])
        .env("NO_COLOR", "1")
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("RUNNER_")) {
        cmd.env_remove(k);
    }
    cmd.spawn().expect("runner starts")
}

/// Starts a submit and returns once its first part file is in place.
pub(crate) fn spawn_until_first_part(dir: &Path, job: &Path, out: &Path) -> Child {
    let child = spawn(dir, job, &[]);
    let t = Instant::now();
    while crate::common::part_files(out) == 0 {
        assert!(t.elapsed() < Duration::from_secs(60), "no part written");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Starts a submit, sends it SIGTERM once its first part is in place and
/// waits for it.
fn terminate_after_first_part(dir: &Path, job: &Path, out: &Path) -> std::process::Output {
    let child = spawn_until_first_part(dir, job, out);
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait_with_output().unwrap()
}

fn by_id(rows: Vec<Row>) -> BTreeMap<String, Row> {
    let n = rows.len();
    let m: BTreeMap<String, Row> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    assert_eq!(m.len(), n, "an id is written more than once");
    m
}

fn assert_same_output(got: &Path, want: &BTreeMap<String, Row>) {
    let got = by_id(rows(got));
    assert_eq!(got.len(), N, "every input id exactly once");
    for (id, w) in want {
        let g = &got[id];
        assert_eq!(g.status, "ok", "{id}");
        assert_eq!(
            g.token_ids, w.token_ids,
            "{id}: greedy tokens differ from the uninterrupted run"
        );
    }
}

fn reference() -> BTreeMap<String, Row> {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "ref");
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    by_id(rows(&tmp.path().join("ref")))
}

/// Seconds-based seed: different moments on every run.
fn rng() -> impl FnMut() -> f64 {
    let mut s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s % 1_000_000) as f64 / 1_000_000.0
    }
}

#[test]
fn kill_9_at_random_moments_then_resume_loses_and_duplicates_nothing() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    let mut next = rng();
    let mut kills = 0;
    let mut moments = Vec::new();
    while kills < 12 {
        let mut child = spawn(tmp.path(), &j, &[]);
        let wait = 0.15 + 0.6 * next();
        std::thread::sleep(Duration::from_secs_f64(wait));
        if child.try_wait().unwrap().is_some() {
            break; // finished before this kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        if kills == 1 && out.join("_manifest.json").exists() {
            let st = runner(tmp.path(), &["status", out.to_str().unwrap()], &[]);
            assert!(
                st.ok && st.stdout.contains("state       dead"),
                "status of a killed job:\n{}",
                st.stdout
            );
        }
        moments.push(format!("{wait:.2}s"));
    }
    eprintln!("killed {kills} times at {moments:?}");
    assert!(
        kills >= 10,
        "only {kills} kills landed before the job finished; make the job longer"
    );
    let mut child = spawn(tmp.path(), &j, &[]);
    let st = child.wait().unwrap();
    assert!(st.success(), "final resume failed");
    assert_same_output(&out, &want);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["state"], "finished");
    let written: u64 = m["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rows"].as_u64().unwrap())
        .sum();
    assert_eq!(written as usize, N, "manifest counts");
    assert!(!out.join(".lock").exists(), "lock released");
}

#[test]
fn sigterm_stops_cleanly_and_resume_finishes() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    let res = terminate_after_first_part(tmp.path(), &j, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "exit code, stderr:\n{stderr}");
    assert!(
        stderr.contains("stopped by a signal") && stderr.contains("resume with `runner submit"),
        "{stderr}"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("_manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["state"], "interrupted");
    let partial = rows(&out).len();
    assert!(partial < N, "stopped before the end ({partial} rows)");
    let status = runner(tmp.path(), &["status", out.to_str().unwrap()], &[]);
    assert!(
        status.ok && status.stdout.contains("state       interrupted"),
        "{}",
        status.stdout
    );
    assert!(
        status
            .stdout
            .contains(&format!("records     {partial} of {N} written")),
        "{}",
        status.stdout
    );
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stderr.contains("resuming"), "{}", run.stderr);
    assert_same_output(&out, &want);
}

#[test]
fn a_live_lock_refuses_and_a_stale_lock_is_taken_over() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let host = runner::job::host_name();
    let me = std::process::id();
    std::fs::write(
        out.join(".lock"),
        format!(r#"{{"pid":{me},"host":"{host}","since_unix":0}}"#),
    )
    .unwrap();
    // A live lock: this process holds the OS lock on the file.
    let held = std::fs::File::open(out.join(".lock")).unwrap();
    held.try_lock().unwrap();
    let run = runner(tmp.path(), &["submit", j.to_str().unwrap()], &[]);
    drop(held);
    let e = error_line(&run);
    assert!(
        e.contains(&format!("is locked by pid {me} on host {host}")),
        "{e}"
    );
    assert!(out.join(".lock").exists(), "a live lock is left alone");
    // pid above any pid_max, and nobody holds the file: its writer is gone.
    std::fs::write(
        out.join(".lock"),
        format!(r#"{{"pid":4000000000,"host":"{host}","since_unix":0}}"#),
    )
    .unwrap();
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(run.stderr.contains("stale lock"), "{}", run.stderr);
    assert_eq!(rows(&out).len(), N);
    assert!(!out.join(".lock").exists());
    // A second submit of the finished job writes nothing new.
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(by_id(rows(&out)).len(), N);
}

#[test]
fn a_changed_job_is_refused_unless_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    let changed = [
        "submit",
        j.to_str().unwrap(),
        "--set",
        "model.dtype=f32",
        "--set",
        "generation.max_new_tokens=5",
    ];
    let run = runner(tmp.path(), &changed, &[]);
    let e = error_line(&run);
    assert!(
        e.contains("holds 240 rows of a different job")
            && e.contains("generation.max_new_tokens: 24 -> 5")
            && e.contains("--restart"),
        "{e}"
    );
    let mut restart = changed.to_vec();
    restart.push("--restart");
    let run = runner(tmp.path(), &restart, &[]);
    assert!(run.ok, "{}", run.stderr);
    let got = by_id(rows(&out));
    assert_eq!(got.len(), N);
    assert!(
        got.values().all(|r| r.token_ids.len() == 5),
        "rows of the restarted job only"
    );
}

#[test]
fn job_level_input_problems_fail_before_any_model_work() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad_input");
    let model = fixtures().join(ALL_MODELS[1]);
    let cases: &[(&str, &str, &str)] = &[
        (
            "duplicate_ids.jsonl",
            "",
            "has duplicate record id `a` (rows 0 and 2)",
        ),
        (
            "duplicate_ids.parquet",
            "",
            "has duplicate record id `a` (rows 0 and 2)",
        ),
        (
            "unknown_column.parquet",
            "",
            "neither input.prompt_column `prompt` nor input.messages_column `messages` is a column",
        ),
        ("missing.jsonl", "", "does not exist (input.path)"),
        (
            "empty_prompt.jsonl",
            "output.path=blocker/out",
            "cannot be created",
        ),
    ];
    std::fs::write(tmp.path().join("blocker"), "a file, not a directory").unwrap();
    for (file, set, want) in cases {
        let src = corpus.join(file);
        let input = tmp.path().join(file);
        if src.exists() {
            std::fs::copy(&src, &input).unwrap();
        }
        let j = write_job(tmp.path(), &model, file, "[output]\npath = \"out\"\n");
        let mut args = vec!["submit", j.to_str().unwrap()];
        if !set.is_empty() {
            args.extend(["--set", set]);
        }
        let run = runner(tmp.path(), &args, &[]);
        let e = error_line(&run);
        assert!(e.contains(want), "{file}: {e}");
        assert_eq!(run.code, Some(2), "{file}: a bad job or input: {e}");
        assert!(
            !run.stderr.contains("model loaded"),
            "{file}: failed only after loading the model"
        );
    }
}

#[test]
fn a_second_signal_exits_at_once_and_the_output_still_resumes() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    let child = spawn_until_first_part(tmp.path(), &j, &out);
    let pid = child.id().to_string();
    for _ in 0..2 {
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
    }
    let res = child.wait_with_output().unwrap();
    assert_eq!(
        res.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let run = runner(
        tmp.path(),
        &["submit", j.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    assert_same_output(&out, &want);
}

/// Regression (new-user issue, item 8): the interrupt hint dropped the
/// `--set` flags, so following it ran another job. It now repeats the
/// command as given, flags included, shell-quoted.
#[test]
fn the_interrupt_hint_repeats_the_set_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let j = job(tmp.path(), "out");
    let out = tmp.path().join("out");
    let res = terminate_after_first_part(tmp.path(), &j, &out);
    let stderr = String::from_utf8_lossy(&res.stderr);
    let hint = format!(
        "resume with `runner submit {} --set model.dtype=f32`",
        j.display()
    );
    assert!(stderr.contains(&hint), "want {hint} in:\n{stderr}");
}
