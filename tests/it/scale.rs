//! Past one device: static shards (`--shard I/N`, `--shard auto`) writing
//! into one output directory, and several engines in one job
//! (`engine.devices`), with a device failing mid-run.

use crate::common::{error_line, fixtures, rows, runner, write_job, Row, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

fn prompts(n: usize) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let filler = "rivers and mountains ".repeat(i % 5);
            serde_json::json!({"id": format!("r{i:03}"), "prompt": format!("Write note {i} about {filler}")})
        })
        .collect()
}

fn write_lines(path: &Path, lines: &[serde_json::Value]) {
    let s: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, s).unwrap();
}

/// A job over `n` prompts of the 8-bit fixture (f32 on the CPU: greedy
/// tokens do not depend on the batch), `extra` appended.
fn job(dir: &Path, n: usize, max_new: usize, extra: &str) -> PathBuf {
    write_lines(&dir.join("p.jsonl"), &prompts(n));
    write_job(
        dir,
        &fixtures().join(ALL_MODELS[1]),
        "p.jsonl",
        &format!(
            "[generation]\nmax_new_tokens = {max_new}\n\n[output]\npath = \"out\"\ninclude_token_ids = true\nflush_every = 4\n\n[engine]\nmax_num_seqs = 8\n{extra}"
        ),
    )
}

fn submit(dir: &Path, job: &Path, extra: &[&str], env: &[(&str, &str)]) -> crate::common::Run {
    let mut args = vec!["submit", job.to_str().unwrap(), "--set", "model.dtype=f32"];
    args.extend_from_slice(extra);
    runner(dir, &args, env)
}

fn by_id(rows: Vec<Row>) -> BTreeMap<String, Row> {
    let n = rows.len();
    let m: BTreeMap<String, Row> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    assert_eq!(m.len(), n, "an id is written more than once");
    m
}

fn assert_same_rows(got: &BTreeMap<String, Row>, want: &BTreeMap<String, Row>) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "every input id exactly once"
    );
    for (id, w) in want {
        let g = &got[id];
        assert_eq!(
            (g.status.as_str(), &g.token_ids),
            ("ok", &w.token_ids),
            "{id}"
        );
    }
}

fn spawn_shard(dir: &Path, job: &Path, args: &[&str]) -> Child {
    crate::resume::spawn(dir, job, args)
}

#[test]
fn three_shards_one_killed_and_rerun_write_every_id_once_with_the_unsharded_outputs() {
    const N: usize = 90;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let j = job(dir, N, 16, "");
    let whole = dir.join("whole.toml");
    std::fs::write(
        &whole,
        std::fs::read_to_string(&j)
            .unwrap()
            .replace("\"out\"", "\"whole\""),
    )
    .unwrap();
    let r = submit(dir, &whole, &[], &[]);
    assert!(r.ok, "{}", r.stderr);
    let want = by_id(rows(&dir.join("whole")));
    assert_eq!(want.len(), N);

    // The three shards side by side in one directory; shard 1 is killed
    // (SIGKILL) once its first part is on disk.
    let out = dir.join("out");
    let others: Vec<Child> = ["0/3", "2/3"]
        .iter()
        .map(|s| spawn_shard(dir, &j, &["--shard", s]))
        .collect();
    // One sequence at a time (engine settings are not the job's identity):
    // slow enough to be killed mid-run after its first part.
    let mut victim = spawn_shard(
        dir,
        &j,
        &["--shard", "1/3", "--set", "engine.max_num_seqs=1"],
    );
    let t = Instant::now();
    while !std::fs::read_dir(&out).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("part-shard-1-of-3-")
        })
    }) {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "shard 1 wrote no part"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    victim.kill().unwrap();
    victim.wait().unwrap();
    for c in others {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let st = runner(dir, &["status", "out"], &[]);
    assert!(st.ok, "{}", st.stderr);
    assert!(
        st.stdout
            .contains("shards      3: 2 done, 0 running, 1 dead"),
        "{}",
        st.stdout
    );
    assert!(st.stdout.contains("shard 1/3: dead"), "{}", st.stdout);
    let written = rows(&out).len();
    assert!(written < N, "the killed shard left records to do");

    let r = submit(dir, &j, &["--shard", "1/3"], &[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("resuming"), "{}", r.stderr);
    assert_same_rows(&by_id(rows(&out)), &want);
    let st = runner(dir, &["status", "out"], &[]);
    assert!(st.stdout.contains("3: 3 done"), "{}", st.stdout);

    // A shard run again when finished does nothing; merge puts the shards
    // in input order.
    let again = submit(dir, &j, &["--shard", "2/3"], &[]);
    assert!(
        again.ok && again.stderr.contains("already complete"),
        "{}",
        again.stderr
    );
    let m = runner(dir, &["merge", "out"], &[]);
    assert!(m.ok, "{}", m.stderr);
    let merged = crate::common::read_file(&dir.join("out.parquet"));
    let ids: Vec<String> = merged
        .iter()
        .flat_map(|b| {
            let c =
                arrow::array::AsArray::as_string::<i32>(b.column_by_name("id").unwrap()).clone();
            (0..arrow::array::Array::len(&c)).map(move |i| c.value(i).to_string())
        })
        .collect();
    assert_eq!(ids, want.keys().cloned().collect::<Vec<_>>());
}

#[test]
fn a_missing_shard_is_named_by_status_and_merge_and_splits_do_not_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let j = job(dir, 12, 2, "");
    let r = submit(dir, &j, &["--shard", "0/2"], &[]);
    assert!(r.ok, "{}", r.stderr);
    let st = runner(dir, &["status", "out"], &[]);
    assert!(st.stdout.contains("shard 1/2: missing"), "{}", st.stdout);
    let m = runner(dir, &["merge", "out"], &[]);
    let e = error_line(&m);
    assert!(e.contains("shard(s) 1/2") && e.contains("missing"), "{e}");
    // Another split, or the whole job, into the same directory: refused.
    for other in [&["--shard", "1/3"][..], &[]] {
        let r = submit(dir, &j, other, &[]);
        let e = error_line(&r);
        assert!(e.contains("2 shards"), "{e}");
        assert_eq!(r.code, Some(6), "a different job's exit code: {}", r.stderr);
    }
}

#[test]
fn the_shard_of_a_record_does_not_change_when_the_input_is_shuffled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let j = job(dir, 60, 1, "");
    let mut lines = prompts(60);
    // A fixed permutation (reversed, then odd rows before even ones).
    lines.reverse();
    let (odd, even): (Vec<_>, Vec<_>) =
        lines.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
    let shuffled: Vec<_> = odd.into_iter().chain(even).map(|(_, l)| l).collect();
    write_lines(&dir.join("shuffled.jsonl"), &shuffled);
    let sj = dir.join("shuffled.toml");
    std::fs::write(
        &sj,
        std::fs::read_to_string(&j)
            .unwrap()
            .replace("p.jsonl", "shuffled.jsonl")
            .replace("\"out\"", "\"out2\""),
    )
    .unwrap();
    let mut sets = vec![];
    for (job, out) in [(&j, "out"), (&sj, "out2")] {
        let r = submit(dir, job, &["--shard", "1/3"], &[]);
        assert!(r.ok, "{}", r.stderr);
        let ids: Vec<String> = by_id(rows(&dir.join(out))).into_keys().collect();
        sets.push(ids);
    }
    assert!((10..30).contains(&sets[0].len()), "{}", sets[0].len());
    assert_eq!(sets[0], sets[1]);
}

#[test]
fn shard_auto_takes_the_slurm_array_task_and_the_kubernetes_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let j = job(dir, 30, 1, "");
    let validate = |env: &[(&str, &str)], extra: &[&str]| {
        let mut args = vec!["validate", j.to_str().unwrap(), "--shard", "auto"];
        args.extend_from_slice(extra);
        runner(dir, &args, env)
    };
    let r = validate(
        &[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ],
        &[],
    );
    assert!(
        r.ok && r.stdout.contains("shard 3/4: "),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let r = validate(&[("JOB_COMPLETION_INDEX", "2")], &["--shard-count", "5"]);
    assert!(
        r.ok && r.stdout.contains("shard 2/5: "),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let e = error_line(&validate(&[("JOB_COMPLETION_INDEX", "2")], &[]));
    assert!(e.contains("--shard-count"), "{e}");
}

#[test]
fn two_engines_in_one_job_write_the_rows_of_one_and_survive_a_failed_device() {
    const N: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let one = job(dir, N, 12, "");
    let r = submit(dir, &one, &[], &[]);
    assert!(r.ok, "{}", r.stderr);
    let want = by_id(rows(&dir.join("out")));

    let two = dir.join("two.toml");
    let text = std::fs::read_to_string(&one).unwrap();
    let two_text = text.replace("\"out\"", "\"two\"") + "devices = [\"cpu\", \"cpu\"]\n";
    std::fs::write(&two, &two_text).unwrap();
    let r = submit(dir, &two, &[], &[]);
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("devices=cpu,cpu"), "{}", r.stderr);
    assert_same_rows(&by_id(rows(&dir.join("two"))), &want);
    // Both engines took records.
    let per_engine: Vec<usize> = r
        .stderr
        .lines()
        .filter(|l| l.contains("engine finished"))
        .map(|l| {
            let v = l.split("records=").nth(1).unwrap();
            v.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(per_engine.len(), 2, "{}", r.stderr);
    assert!(per_engine.iter().all(|&n| n > 0), "{per_engine:?}");
    assert_eq!(per_engine.iter().sum::<usize>(), N);

    // The second engine fails after 15 steps (rows written): its unfinished records go to
    // the first, every record is written once, and the exit code says a
    // device failed (4).
    std::fs::write(&two, two_text.replace("\"two\"", "\"fault\"")).unwrap();
    let r = submit(
        dir,
        &two,
        &[],
        &[("RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS", "15@1")],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    let e = error_line(&r);
    assert!(
        e.contains("cpu failed") && e.contains("every record is written"),
        "{e}"
    );
    assert_same_rows(&by_id(rows(&dir.join("fault"))), &want);
    // The run's figures count the failed engine's rows too.
    let metrics = crate::common::json(&dir.join("fault/_metrics.json"));
    assert_eq!(metrics["last_run"]["records"], N, "{metrics}");
    let st = runner(dir, &["status", "fault"], &[]);
    assert!(st.stdout.contains("state       finished"), "{}", st.stdout);

    // A panic in an engine's thread is that device's failure too.
    std::fs::write(&two, two_text.replace("\"two\"", "\"panic\"")).unwrap();
    let r = submit(
        dir,
        &two,
        &[],
        &[("RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS", "3@0:panic")],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    let e = error_line(&r);
    assert!(e.contains("panicked: injected device panic"), "{e}");
    assert_same_rows(&by_id(rows(&dir.join("panic"))), &want);

    // Both fail once each has written rows: the job is left for resume
    // (dead until then), which finishes it.
    std::fs::write(&two, two_text.replace("\"two\"", "\"both\"")).unwrap();
    let r = submit(
        dir,
        &two,
        &[],
        &[("RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS", "20")],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    assert!(error_line(&r).contains("next submit"), "{}", r.stderr);
    assert!(rows(&dir.join("both")).len() < N, "records were left");
    let st = runner(dir, &["status", "both"], &[]);
    assert!(
        st.stdout.contains("state       dead"),
        "{}\n{}",
        st.stdout,
        st.stderr
    );
    let r = submit(dir, &two, &[], &[]);
    assert!(r.ok, "{}", r.stderr);
    assert_same_rows(&by_id(rows(&dir.join("both"))), &want);
}

#[test]
fn a_failed_device_hands_back_records_of_several_samples_exactly_once() {
    // n = 2 sampled completions per record (forked from one prefill): the
    // hand-back tracks (id, sample), and the other engine writes exactly
    // the samples not yet written (seeded: the same tokens as one engine).
    const N: usize = 24;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let extra = "devices = [\"cpu\", \"cpu\"]\n";
    let one = job(dir, N, 10, "");
    let text = std::fs::read_to_string(&one).unwrap().replace(
        "max_new_tokens = 10\n",
        "max_new_tokens = 10\nn = 2\ntemperature = 0.8\nseed = 7\n",
    );
    std::fs::write(&one, &text).unwrap();
    let r = submit(dir, &one, &[], &[]);
    assert!(r.ok, "{}", r.stderr);
    let key = |r: &Row| (r.id.clone(), r.sample_index);
    let want: BTreeMap<_, _> = rows(&dir.join("out"))
        .into_iter()
        .map(|r| (key(&r), r))
        .collect();
    assert_eq!(want.len(), 2 * N);
    let two = dir.join("two.toml");
    std::fs::write(&two, text.replace("\"out\"", "\"two\"") + extra).unwrap();
    let r = submit(
        dir,
        &two,
        &[],
        &[("RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS", "6@1")],
    );
    assert_eq!(r.code, Some(4), "{}", r.stderr);
    let got = rows(&dir.join("two"));
    assert_eq!(got.len(), 2 * N, "every (id, sample) once");
    let got: BTreeMap<_, _> = got.into_iter().map(|r| (key(&r), r)).collect();
    assert_eq!(got.len(), 2 * N, "an (id, sample) is written twice");
    for (k, w) in &want {
        assert_eq!(got[k].token_ids, w.token_ids, "{k:?}");
    }
}
