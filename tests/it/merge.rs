//! `runner merge` (where the merged file goes, parts that differ) and the
//! job identity that keeps parts alike.

use crate::common::{error_line, fixtures, rows, runner, write_job, ALL_MODELS};
use std::path::Path;

fn small_job(dir: &Path, out: &str, extra: &str) -> std::path::PathBuf {
    let lines: String = (0..6)
        .map(|i| format!("{{\"id\": {i}, \"prompt\": \"count to {i}\"}}\n"))
        .collect();
    std::fs::write(dir.join("p.jsonl"), lines).unwrap();
    let text = format!(
        "[generation]\nmax_new_tokens = 4\n\n[output]\npath = \"{out}\"\nflush_every = 3\n{extra}"
    );
    write_job(dir, &fixtures().join(ALL_MODELS[1]), "p.jsonl", &text)
}

/// Regression (new-user issue, item 7): `runner merge .` inside the output
/// directory wrote `./output.parquet` into the dataset itself.
#[test]
fn merge_never_writes_inside_the_output_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let job = small_job(tmp.path(), "out", "");
    let out = tmp.path().join("out");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let run = runner(&out, &["merge", "."], &[]);
    assert!(run.ok, "{}", run.stderr);
    assert!(
        tmp.path().join("out.parquet").is_file(),
        "beside the directory"
    );
    let inside: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet") && !n.starts_with("part-"))
        .collect();
    assert!(
        inside.is_empty(),
        "merged file inside the output: {inside:?}"
    );
    let run = runner(&out, &["merge", ".", "--into", "merged.parquet"], &[]);
    assert!(!run.ok);
    assert!(
        error_line(&run).contains("inside the output directory"),
        "{}",
        run.stderr
    );
}

/// Regression (new-user issue, item 5, merge): parts with other columns
/// (a job resumed with other output settings) were merged by dropping
/// columns, exit 0. Now merge refuses, naming both parts.
#[test]
fn merge_refuses_parts_with_different_columns() {
    let tmp = tempfile::tempdir().unwrap();
    let job = small_job(tmp.path(), "a", "");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let job = small_job(tmp.path(), "b", "include_token_ids = true\n");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let part = std::fs::read_dir(&b)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
        })
        .unwrap();
    std::fs::copy(&part, a.join("part-99999-other.parquet")).unwrap();
    let run = runner(tmp.path(), &["merge", a.to_str().unwrap()], &[]);
    assert!(!run.ok, "merge must refuse: {}", run.stderr);
    let line = error_line(&run);
    assert!(
        line.contains("part-99999-other.parquet") && line.contains("different columns"),
        "{line}"
    );
}

/// Regression (new-user issue, item 5, identity): resuming with other
/// `scoring.metrics` mixed schemas across parts. Scoring settings are part
/// of the job now: such a resume is refused naming the key.
#[test]
fn scoring_settings_are_part_of_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let job = small_job(tmp.path(), "out", "");
    let run = runner(tmp.path(), &["submit", job.to_str().unwrap()], &[]);
    assert!(run.ok, "{}", run.stderr);
    let other = ["--set", "scoring.metrics=[\"exact_match\"]"];
    let mut args = vec!["submit", job.to_str().unwrap()];
    args.extend(other);
    let run = runner(tmp.path(), &args, &[]);
    assert!(!run.ok);
    let line = error_line(&run);
    assert!(
        line.contains("different job") && line.contains("scoring.metrics"),
        "{line}"
    );
    args.push("--restart");
    let run = runner(tmp.path(), &args, &[]);
    assert!(run.ok, "{}", run.stderr);
    assert_eq!(rows(&tmp.path().join("out")).len(), 6);
}
