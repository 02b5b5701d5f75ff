//! `generation.n` through the real CLI on a fixture model: samples are
//! reproducible alone, independent of n and batching, exactly once after
//! kill -9 + resume, and share one prefill per record.

use crate::common::{fixtures, json, rows, runner, write_job, ALL_MODELS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const RECORDS: usize = 40;

/// Completion ids by (id, sample index); each pair exactly once.
type Samples = BTreeMap<(String, u32), Vec<u32>>;

fn samples(out: &Path) -> Samples {
    let mut m = Samples::new();
    for r in rows(out) {
        assert_eq!(r.status, "ok", "{:?}", r.error);
        let key = (r.id.clone(), r.sample_index);
        assert!(
            m.insert(key, r.token_ids).is_none(),
            "{} sample {} twice",
            r.id,
            r.sample_index
        );
    }
    m
}

/// A sampling job over `RECORDS` prompts (two share a long prefix, so the
/// prefix cache is in play too) writing into `out`.
fn job(dir: &Path, out: &str, temperature: f64) -> PathBuf {
    let mut s = String::new();
    for i in 0..RECORDS {
        let topic = ["rivers", "mountains", "cities", "forests"][i % 4];
        let p = format!("Write a short note number {i} about {topic}.");
        s.push_str(&serde_json::json!({"id": format!("r{i:02}"), "prompt": p}).to_string());
        s.push('\n');
    }
    std::fs::write(dir.join("p.jsonl"), s).unwrap();
    let j = write_job(
        dir,
        &fixtures().join(ALL_MODELS[1]),
        "p.jsonl",
        &format!(
            "[generation]\nmax_new_tokens = 12\ntemperature = {temperature}\nseed = 11\nn = 4\n\n[output]\npath = \"{out}\"\ninclude_token_ids = true\nflush_every = 4\n\n[engine]\nmax_num_seqs = 16\n"
        ),
    );
    let named = dir.join(format!("{out}.toml"));
    std::fs::rename(j, &named).unwrap();
    named
}

fn submit(dir: &Path, job: &Path, set: &[&str]) {
    let mut args = vec!["submit", job.to_str().unwrap(), "--set", "model.dtype=f32"];
    for s in set.iter().chain(EXTRA.with(|e| e.borrow().clone()).iter()) {
        args.extend(["--set", s]);
    }
    let run = runner(dir, &args, &[]);
    assert!(run.ok, "{}", run.stderr);
}

fn prefill_tokens(out: &Path) -> u64 {
    json(&out.join("_metrics.json"))["last_run"]["prefill_tokens"]
        .as_u64()
        .expect("last_run.prefill_tokens")
}

#[test]
fn n_samples_are_reproducible_alone_and_share_one_prefill() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let j = job(d, "a", 0.9);
    submit(d, &j, &[]);
    let a = samples(&d.join("a"));
    assert_eq!(a.len(), 4 * RECORDS);
    let distinct: std::collections::HashSet<&Vec<u32>> = a.values().collect();
    assert!(distinct.len() > RECORDS, "samples of a record differ");

    submit(d, &j, &["output.path=b"]);
    assert_eq!(samples(&d.join("b")), a, "two runs give the same rows");

    submit(d, &j, &["output.path=c", "engine.max_num_seqs=1"]);
    assert_eq!(samples(&d.join("c")), a, "max_num_seqs 1 and 16 agree");

    submit(d, &j, &["output.path=three", "generation.n=3"]);
    let three = samples(&d.join("three"));
    assert_eq!(three.len(), 3 * RECORDS);
    for (k, v) in &three {
        assert_eq!(&a[k], v, "{k:?}: n = 3 against n = 4");
    }

    submit(d, &j, &["output.path=one", "generation.n=1"]);
    let one = samples(&d.join("one"));
    for (k, v) in &one {
        assert_eq!(&a[k], v, "{k:?}: n = 1 against n = 4");
    }
    assert_eq!(
        prefill_tokens(&d.join("a")),
        prefill_tokens(&d.join("one")),
        "n = 4 runs the prompts' prefill once, as n = 1"
    );
    let forks = rows(&d.join("a"));
    for r in forks.iter().filter(|r| r.sample_index > 0) {
        assert_eq!(
            r.cached_prompt_tokens, r.prompt_tokens,
            "{} {}",
            r.id, r.sample_index
        );
    }
}

thread_local! {
    /// `--set` flags every submit of this thread adds (the GPU's device and dtype).
    static EXTRA: std::cell::RefCell<Vec<&'static str>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[test]
fn greedy_samples_equal_the_single_greedy_completion() {
    greedy_samples_agree(&[]);
}

/// Greedy samples must all equal the one greedy completion: a fork whose
/// copy-on-write of the shared partial block went wrong would diverge.
/// `sets` are added to every submit.
pub fn greedy_samples_agree(sets: &[&'static str]) {
    EXTRA.with(|e| *e.borrow_mut() = sets.to_vec());
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let j = job(d, "g", 0.0);
    submit(d, &j, &[]);
    submit(d, &j, &["output.path=g1", "generation.n=1"]);
    let (four, one) = (samples(&d.join("g")), samples(&d.join("g1")));
    for ((id, i), v) in &four {
        assert_eq!(&one[&(id.clone(), 0)], v, "{id} sample {i}");
    }
    assert_eq!(four.len(), 4 * RECORDS);
}

#[test]
fn kill_9_and_resume_write_every_sample_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let j = job(d, "k", 0.9);
    submit(d, &j, &["output.path=want"]);
    let want = samples(&d.join("want"));
    let out = d.join("k");
    let mut child = crate::resume::spawn_until_first_part(d, &j, &out);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = rows(&out).len();
    assert!(
        partial < 4 * RECORDS,
        "killed before the end ({partial} rows)"
    );
    let run = runner(d, &["status", out.to_str().unwrap()], &[]);
    assert!(
        run.stdout.contains(&format!("of {} written", 4 * RECORDS)),
        "{}",
        run.stdout
    );
    submit(d, &j, &[]);
    assert_eq!(
        samples(&out),
        want,
        "resumed rows equal an uninterrupted run"
    );
}
