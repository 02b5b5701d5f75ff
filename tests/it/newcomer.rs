//! The new-user defects (issue 12) through the real CLI, one test each.

use crate::common::{error_line, fixtures, rows, runner, write_job, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Submits `input` (JSONL text) with `extra` job text; the rows by id.
fn submit(dir: &Path, input: &str, extra: &str) -> BTreeMap<String, Row> {
    std::fs::write(dir.join("in.jsonl"), input).unwrap();
    let out = dir.join("out");
    let job = write_job(
        dir,
        &fixtures().join(ALL_MODELS[0]),
        "in.jsonl",
        &format!(
            "{extra}\n[output]\npath = \"{}\"\ninclude_token_ids = true\n",
            out.display()
        ),
    );
    let run = runner(
        dir,
        &["submit", job.to_str().unwrap(), "--set", "model.dtype=f32"],
        &[],
    );
    assert!(run.ok, "{}", run.stderr);
    rows(&out).into_iter().map(|r| (r.id.clone(), r)).collect()
}

/// `n` records `{"id": i, "prompt": "<word> i"}` in `in.jsonl`, and a job
/// over them on the 4-bit fixture: `sections` before `[output]`, `output`
/// inside it after the path. Returns the job file and the output directory.
fn numbered_job(
    dir: &Path,
    n: usize,
    word: &str,
    sections: &str,
    output: &str,
) -> (PathBuf, PathBuf) {
    let input: String = (0..n)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": i, "prompt": format!("{word} {i}")})
            )
        })
        .collect();
    std::fs::write(dir.join("in.jsonl"), input).unwrap();
    let out = dir.join("out");
    let job = write_job(
        dir,
        &fixtures().join(ALL_MODELS[1]),
        "in.jsonl",
        &format!(
            "{sections}\n[output]\npath = \"{}\"\n{output}",
            out.display()
        ),
    );
    (job, out)
}

#[test]
fn messages_records_get_the_system_prompt_unless_they_have_one() {
    let tmp = tempfile::tempdir().unwrap();
    let user = serde_json::json!([{"role": "user", "content": "name a colour"}]);
    let own = serde_json::json!([{"role": "system", "content": "You answer in French."},
                                 {"role": "user", "content": "name a colour"}]);
    let lines = [
        serde_json::json!({"id": "prompt", "prompt": "name a colour"}),
        serde_json::json!({"id": "messages", "messages": user}),
        serde_json::json!({"id": "prompt-system", "prompt": "name a colour", "system": "You answer in French."}),
        serde_json::json!({"id": "messages-system", "messages": user, "system": "You answer in French."}),
        serde_json::json!({"id": "messages-own", "messages": own, "system": "ignored: the list has one"}),
    ];
    let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let rows = submit(
        tmp.path(),
        &input,
        "[generation]\nmax_new_tokens = 4\nsystem_prompt = \"You are a careful assistant who thinks step by step.\"\n",
    );
    let same = |a: &str, b: &str| {
        assert_eq!(
            (rows[a].prompt_tokens, &rows[a].token_ids),
            (rows[b].prompt_tokens, &rows[b].token_ids),
            "{a} and {b} must be the same prompt"
        );
    };
    // The job's system prompt reaches a messages record without one ...
    same("messages", "prompt");
    // ... the record's `system` column comes first ...
    same("messages-system", "prompt-system");
    // ... and a list with its own system message keeps it.
    same("messages-own", "prompt-system");
    assert_ne!(
        rows["prompt"].prompt_tokens,
        rows["prompt-system"].prompt_tokens
    );
}

#[test]
fn rows_are_written_by_time_as_well_as_by_count() {
    let tmp = tempfile::tempdir().unwrap();
    let (job, out) = numbered_job(
        tmp.path(),
        12,
        "count to",
        "[generation]\nmax_new_tokens = 3\n\n[engine]\nmax_num_seqs = 2\n",
        "flush_every = 1024\nflush_every_s = 0.000001\n",
    );
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    // 12 records, two at a time: finished rows never wait for 1,024 more.
    let parts = crate::common::part_files(&out);
    assert!(
        parts >= 2,
        "{parts} part file(s): the time limit did not flush"
    );
    assert_eq!(rows(&out).len(), 12);
    // The setting is checked like the others.
    let bad = runner(
        tmp.path(),
        &[
            "validate",
            job.to_str().unwrap(),
            "--set",
            "output.flush_every_s=0",
        ],
        &[],
    );
    let e = crate::common::error_line(&bad);
    assert!(e.contains("output.flush_every_s is 0"), "{e}");
}

#[test]
fn an_upper_case_extension_names_the_format() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("DATA.JSONL"),
        "{\"id\": 1, \"prompt\": \"hi\"}\n",
    )
    .unwrap();
    let job = write_job(
        tmp.path(),
        &fixtures().join(ALL_MODELS[1]),
        "DATA.JSONL",
        "",
    );
    let run = runner(tmp.path(), &["validate", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
}

#[test]
fn a_job_that_fails_its_checks_leaves_no_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("in.jsonl"),
        "{\"id\": 1, \"prompt\": \"a\"}\n{\"id\": 1, \"prompt\": \"b\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("fresh-out");
    let job = write_job(
        tmp.path(),
        &fixtures().join(ALL_MODELS[1]),
        "in.jsonl",
        &format!("[output]\npath = \"{}\"\n", out.display()),
    );
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(
        !run.ok && crate::common::error_line(&run).contains("duplicate"),
        "{}",
        run.stderr
    );
    assert!(!out.exists(), "the failed job left {}", out.display());
    // An output directory that existed before is left as it was.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(!run.ok);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn report_on_a_single_job_says_it_is_not_a_sweep() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = submit(
        tmp.path(),
        "{\"id\": 1, \"prompt\": \"hi\"}\n",
        "[generation]\nmax_new_tokens = 2\n",
    );
    assert_eq!(rows.len(), 1);
    let out = tmp.path().join("out");
    let run = runner(tmp.path(), &["report", out.to_str().unwrap()], &[]);
    let e = crate::common::error_line(&run);
    assert!(
        !run.ok && e.contains("is the output of a single job, not of a sweep"),
        "{e}"
    );
}

#[test]
fn resume_does_not_depend_on_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let proj = tmp.path().join("proj");
    std::fs::create_dir_all(proj.join("jobs")).unwrap();
    std::fs::create_dir_all(proj.join("data")).unwrap();
    std::fs::write(
        proj.join("data/in.jsonl"),
        "{\"id\": 1, \"prompt\": \"hi\"}\n",
    )
    .unwrap();
    std::fs::write(
        proj.join("jobs/job.toml"),
        format!(
            "[model]\nid = \"{}\"\n\n[input]\npath = \"../data/in.jsonl\"\n\n[generation]\nmax_new_tokens = 2\n\n[output]\npath = \"../out\"\n",
            fixtures().join(ALL_MODELS[1]).display()
        ),
    )
    .unwrap();
    let first = runner(&proj, &["submit", "jobs/job.toml"], &[]);
    assert!(first.ok, "{}", first.stderr);
    // The same job, named from another directory by its absolute path.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let abs = proj.join("jobs/job.toml");
    let again = runner(
        &elsewhere,
        &["submit", abs.to_str().unwrap()],
        &[("RUNNER_LOG", "info")],
    );
    assert!(again.ok, "{}", again.stderr);
    assert!(
        again.stderr.contains("already complete"),
        "{}",
        again.stderr
    );
}

#[test]
fn without_a_terminal_progress_is_logged_on_a_timer_without_colour() {
    let tmp = tempfile::tempdir().unwrap();
    let (job, _) = numbered_job(
        tmp.path(),
        6,
        "story",
        "[generation]\nmax_new_tokens = 200\nignore_eos = true\n\n[engine]\nmax_num_seqs = 1\n",
        "",
    );
    // stderr is a pipe here; NO_COLOR is not set.
    let run = runner(
        tmp.path(),
        &["submit", job.to_str().unwrap(), "--progress-every", "0.01"],
        &[("NO_COLOR", "")],
    );
    assert!(run.ok, "{}", run.stderr);
    assert!(
        run.stderr.contains("progress"),
        "no timed progress line:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains('\u{1b}'),
        "ANSI escapes on a pipe:\n{}",
        run.stderr
    );
}

#[test]
fn a_corrupt_part_is_reported_by_status_and_merge_and_quarantined_by_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let (job, out) = numbered_job(
        tmp.path(),
        9,
        "item",
        "[generation]\nmax_new_tokens = 2\n",
        "flush_every = 3\n",
    );
    let job = job.to_str().unwrap();
    assert!(runner(tmp.path(), &["submit", job], &[]).ok);
    let mut parts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    parts.sort();
    assert!(parts.len() >= 2, "{parts:?}");
    let bad = &parts[1];
    let name = bad.file_name().unwrap().to_str().unwrap().to_string();
    let len = std::fs::metadata(bad).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(bad)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let st = runner(tmp.path(), &["status", out.to_str().unwrap()], &[]);
    assert_eq!(st.code, Some(7), "{}\n{}", st.stdout, st.stderr);
    assert!(
        st.stdout.contains("1 damaged") && crate::common::error_line(&st).contains(&name),
        "{}",
        st.stderr
    );

    let merged = runner(tmp.path(), &["merge", out.to_str().unwrap()], &[]);
    let e = crate::common::error_line(&merged);
    assert_eq!(merged.code, Some(7), "{e}");
    assert!(e.contains(&name) && e.contains("runner submit"), "{e}");

    let resumed = runner(tmp.path(), &["submit", job], &[]);
    assert!(resumed.ok, "{}", resumed.stderr);
    assert!(resumed.stderr.contains("_quarantine"), "{}", resumed.stderr);
    assert!(out.join("_quarantine").join(&name).is_file());
    let mut ids: Vec<String> = rows(&out).into_iter().map(|r| r.id).collect();
    ids.sort();
    let mut want: Vec<String> = (0..9).map(|i| i.to_string()).collect();
    want.sort();
    assert_eq!(ids, want, "every record exactly once after resume");
    assert!(runner(tmp.path(), &["status", out.to_str().unwrap()], &[]).ok);
}

#[test]
fn a_held_lock_and_a_changed_job_have_their_own_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = submit(
        tmp.path(),
        "{\"id\": 1, \"prompt\": \"hi\"}\n",
        "[generation]\nmax_new_tokens = 2\n",
    );
    assert_eq!(rows.len(), 1);
    let out = tmp.path().join("out");
    let job = tmp.path().join("job.toml");
    let job = job.to_str().unwrap();
    // 6: the same output, another job.
    let changed = runner(
        tmp.path(),
        &[
            "submit",
            job,
            "--set",
            "model.dtype=f32",
            "--set",
            "generation.max_new_tokens=3",
        ],
        &[],
    );
    let e = crate::common::error_line(&changed);
    assert_eq!(changed.code, Some(6), "{e}");
    assert!(
        e.contains("different job") && e.contains("generation.max_new_tokens"),
        "{e}"
    );
    // 5: another process holds the output's lock (this test, here).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out.join(".lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let held = runner(
        tmp.path(),
        &["submit", job, "--set", "model.dtype=f32"],
        &[],
    );
    let e = crate::common::error_line(&held);
    assert_eq!(held.code, Some(5), "{e}");
    assert!(e.contains("is locked"), "{e}");
}

#[test]
fn status_and_merge_on_a_sweep_root_work_per_variant() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("in.jsonl"),
        "{\"id\": 1, \"prompt\": \"hi\"}\n{\"id\": 2, \"prompt\": \"yo\"}\n",
    )
    .unwrap();
    let (a, b) = (
        fixtures().join(ALL_MODELS[1]),
        fixtures().join(ALL_MODELS[3]),
    );
    std::fs::write(
        tmp.path().join("sweep.toml"),
        format!(
            "[model]\nid = \"{}\"\n\n[input]\npath = \"in.jsonl\"\n\n[generation]\nmax_new_tokens = 2\n\n[output]\npath = \"sweep\"\n\n[sweep]\nmodels = [\"{}\", \"{}\"]\n",
            a.display(),
            a.display(),
            b.display()
        ),
    )
    .unwrap();
    assert!(runner(tmp.path(), &["submit", "sweep.toml"], &[]).ok);
    let st = runner(tmp.path(), &["status", "sweep"], &[]);
    assert!(st.ok, "{}", st.stderr);
    for m in [ALL_MODELS[1], ALL_MODELS[3]] {
        assert!(
            st.stdout
                .contains(&format!("variant={m}: finished, 2 of 2 records")),
            "{}",
            st.stdout
        );
    }
    let merged = runner(tmp.path(), &["merge", "sweep"], &[]);
    assert!(merged.ok, "{}", merged.stderr);
    for m in [ALL_MODELS[1], ALL_MODELS[3]] {
        let f = tmp
            .path()
            .join("sweep-merged")
            .join(format!("variant={m}.parquet"));
        let rows: usize = crate::common::read_file(&f)
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 2, "{}", f.display());
    }
    // Nothing was written inside the sweep output.
    let inside = std::fs::read_dir(tmp.path().join("sweep"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "parquet")
        })
        .count();
    assert_eq!(inside, 0);
}

#[test]
fn anything_else_exits_1() {
    // Exit-code table, row 1: a failure that is neither the job, the model,
    // the device, the lock, another job nor a damaged part.
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("not-an-output");
    std::fs::create_dir(&empty).unwrap();
    let run = runner(tmp.path(), &["status", empty.to_str().unwrap()], &[]);
    let e = crate::common::error_line(&run);
    assert_eq!(run.code, Some(1), "{e}");
    assert!(e.contains("not the output of a runner job"), "{e}");
}

/// Exit code 4 (the GPU failed at run time), through the test-only fault
/// (`RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS`): the parts written before the
/// fault stay, and a resume writes every other record exactly once.
#[test]
fn a_device_fault_exits_4_and_the_job_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (job, out) = numbered_job(
        tmp.path(),
        40,
        "count to",
        "[generation]\nmax_new_tokens = 6\n\n[engine]\nmax_num_seqs = 4\n",
        "flush_every = 4\ninclude_token_ids = true\n",
    );
    let args = ["submit", job.to_str().unwrap(), "--set", "model.dtype=f32"];
    let fault = ("RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS", "30");
    let run = runner(tmp.path(), &args, &[fault]);
    assert_eq!(run.code, Some(4), "{}", run.stderr);
    assert!(
        error_line(&run).contains("injected device fault"),
        "{}",
        run.stderr
    );
    let before = rows(&out).len();
    assert!(
        before > 0 && before < 40,
        "{before} rows written before the fault"
    );
    let again = runner(tmp.path(), &args, &[]);
    assert!(again.ok, "{}", again.stderr);
    let all = rows(&out);
    let ids: std::collections::BTreeSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        (all.len(), ids.len()),
        (40, 40),
        "every record exactly once"
    );
}

/// On a terminal (a pty from util-linux `script`), warnings are written
/// above the progress bar, never onto it: no line of the terminal's output
/// holds both the bar and a warning.
#[test]
fn warnings_on_a_terminal_do_not_print_onto_the_bar() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("util-linux `script` is needed to give the run a terminal");
    }
    let tmp = tempfile::tempdir().unwrap();
    let input: String = (0..40)
        .map(|i| {
            let words = if i % 4 == 3 { 60 } else { 3 };
            let p = vec!["word"; words].join(" ");
            format!("{}\n", serde_json::json!({"id": i, "prompt": p}))
        })
        .collect();
    std::fs::write(tmp.path().join("in.jsonl"), input).unwrap();
    let job = write_job(
        tmp.path(),
        &fixtures().join(ALL_MODELS[1]),
        "in.jsonl",
        "[generation]\nmax_new_tokens = 8\n\n[engine]\nmax_num_seqs = 2\nmax_prompt_tokens = 40\n\n[output]\npath = \"out\"\n",
    );
    let bin = std::env::var("TEST_RUNNER_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_runner").to_string());
    let cmd = format!("{bin} submit {} --set model.dtype=f32", job.display());
    let out = std::process::Command::new("script")
        .current_dir(tmp.path())
        .args(["-qefc", &cmd, "/dev/null"])
        .env("NO_COLOR", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let ansi = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").unwrap();
    let plain = ansi.replace_all(&text, "");
    let segments: Vec<&str> = plain.split(['\r', '\n']).collect();
    let bar = |s: &str| s.contains(" records") && s.contains("eta");
    let first_bar = segments
        .iter()
        .position(|s| bar(s))
        .expect("the bar is drawn");
    let warns: Vec<usize> = (0..segments.len())
        .filter(|&i| segments[i].contains("WARN"))
        .collect();
    assert!(
        warns.iter().any(|&i| i > first_bar),
        "a warning comes while the bar is up:\n{plain}"
    );
    for i in warns {
        assert!(
            !bar(segments[i]),
            "a warning printed onto the bar: {:?}",
            segments[i]
        );
    }
}
