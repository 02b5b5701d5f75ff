//! Shared helpers: fixture paths, running the binary, reading output.

use arrow::array::{Array, AsArray, RecordBatch};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The fixtures directory (`../shared/fixtures` beside the checkout, or
/// `TEST_FIXTURES_DIR` when the test binary runs elsewhere, e.g. on a GPU
/// machine).
pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("TEST_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(
        p.is_dir(),
        "fixtures missing at {}: the tests need ../shared/fixtures",
        p.display()
    );
    p
}

/// The four fixture models.
pub const ALL_MODELS: &[&str] = &[
    "tiny-mistral-fp16",
    "tiny-mistral-gptq-4bit-128g-actorder_True",
    "tiny-mistral-gptq-4bit-32g-actorder_True",
    "tiny-mistral-gptq-8bit--1g-actorder_True",
];

/// The fixture models a run checks: all four, or the comma-separated
/// `TEST_MODELS` (a GPU machine gets the fixtures in two transfers); the
/// choice is printed so that a partial run says so.
pub fn models() -> Vec<&'static str> {
    match std::env::var("TEST_MODELS") {
        Ok(list) => {
            let chosen: Vec<&'static str> = ALL_MODELS
                .iter()
                .copied()
                .filter(|m| list.split(',').any(|x| x.trim() == *m))
                .collect();
            assert!(
                !chosen.is_empty(),
                "TEST_MODELS={list} names no fixture model"
            );
            eprintln!("TEST_MODELS: checking {chosen:?} of {ALL_MODELS:?}");
            chosen
        }
        Err(_) => ALL_MODELS.to_vec(),
    }
}

/// The reference path of a model for a dtype.
pub fn reference_path(model: &str, f16: bool) -> &'static str {
    match (model.contains("gptq"), f16) {
        (true, true) => "gptqmodel-torch-fp16",
        (true, false) => "dequant-hf-fp32",
        (false, true) => "hf-fp16",
        (false, false) => "hf-fp32",
    }
}

/// A JSON array of token ids.
pub fn token_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("a JSON array of token ids")
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Reads a JSON file.
pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Output of one run of the binary.
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stderr: String,
    pub stdout: String,
}

/// Runs `runner ARGS` in `cwd` with a clean RUNNER_* environment, NO_COLOR
/// set and HF_HUB_OFFLINE; an `env` entry with an empty value unsets.
pub fn runner(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let bin = std::env::var_os("TEST_RUNNER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_runner")));
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd)
        .args(args)
        .env("NO_COLOR", "1")
        .env("HF_HUB_OFFLINE", "1");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("RUNNER_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        match v.is_empty() {
            true => cmd.env_remove(k),
            false => cmd.env(k, v),
        };
    }
    let out = cmd.output().expect("runner binary runs");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

/// The final `error: ...` line of a failed run.
pub fn error_line(run: &Run) -> String {
    assert!(!run.ok, "expected failure, stderr:\n{}", run.stderr);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one error line expected, stderr:\n{}",
        run.stderr
    );
    lines[0].to_string()
}

/// The record batches of one Parquet file.
pub fn read_file(path: &Path) -> Vec<RecordBatch> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Reads every part file of an output directory into batches.
pub fn read_output(dir: &Path) -> Vec<RecordBatch> {
    let mut parts: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    parts.sort();
    assert!(!parts.is_empty(), "no part files in {}", dir.display());
    let mut out = vec![];
    for p in parts {
        let f = std::fs::File::open(&p).unwrap();
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        out.extend(r.map(|b| b.unwrap()));
    }
    out
}

/// One output row, the fields the tests look at.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: String,
    pub status: String,
    pub finish_reason: String,
    pub error: Option<String>,
    pub completion: Option<String>,
    pub prompt_tokens: u32,
    pub cached_prompt_tokens: u32,
    pub token_ids: Vec<u32>,
    pub sample_index: u32,
}

/// Rows of an output directory, keyed by nothing (input order not kept).
pub fn rows(dir: &Path) -> Vec<Row> {
    let mut v = vec![];
    for b in read_output(dir) {
        let s = |name: &str| b.column_by_name(name).unwrap().as_string::<i32>().clone();
        let (id, status, fr, err, comp) = (
            s("id"),
            s("status"),
            s("finish_reason"),
            s("error"),
            s("completion"),
        );
        let pt = b
            .column_by_name("prompt_tokens")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>()
            .clone();
        let cached = b
            .column_by_name("cached_prompt_tokens")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>()
            .clone();
        let ids = b
            .column_by_name("completion_token_ids")
            .map(|c| c.as_list::<i32>().clone());
        let sample = b
            .column_by_name("sample_index")
            .unwrap()
            .as_primitive::<arrow::datatypes::UInt32Type>()
            .clone();
        for i in 0..b.num_rows() {
            v.push(Row {
                id: id.value(i).to_string(),
                status: status.value(i).to_string(),
                finish_reason: fr.value(i).to_string(),
                error: (!err.is_null(i)).then(|| err.value(i).to_string()),
                completion: (!comp.is_null(i)).then(|| comp.value(i).to_string()),
                prompt_tokens: pt.value(i),
                cached_prompt_tokens: cached.value(i),
                sample_index: sample.value(i),
                token_ids: ids
                    .as_ref()
                    .map(|l| {
                        l.value(i)
                            .as_primitive::<arrow::datatypes::UInt32Type>()
                            .values()
                            .to_vec()
                    })
                    .unwrap_or_default(),
            });
        }
    }
    v
}

/// Writes a job file; `extra` is appended verbatim.
pub fn write_job(dir: &Path, model: &Path, input: &str, extra: &str) -> PathBuf {
    let p = dir.join("job.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nid = \"{}\"\n\n[input]\npath = \"{input}\"\n\n{extra}\n",
            model.display()
        ),
    )
    .unwrap();
    p
}

/// Part files in an output directory (0 when it does not exist yet).
pub fn part_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("part-") && n.ends_with(".parquet")
            })
            .count()
    })
}

/// A Python interpreter that imports pyarrow (see [`python_with`]).
pub fn pyarrow_python() -> (PathBuf, Option<PathBuf>) {
    python_with("pyarrow")
}

/// A Python interpreter that imports `package` (its PyPI and module name):
/// `python3` when it already does, else one provisioned once under
/// `target/<package>-venv` (a venv with the package from the registry;
/// `pip install --target target/<package>-site` where venv is missing), so
/// that `cargo test` needs only Rust and python3. The second value is a
/// PYTHONPATH to set, if any.
pub fn python_with(package: &str) -> (PathBuf, Option<PathBuf>) {
    let imports = |py: &Path, path: Option<&Path>| {
        let mut c = Command::new(py);
        c.args(["-c", &format!("import {package}")]);
        if let Some(p) = path {
            c.env("PYTHONPATH", p);
        }
        c.output().is_ok_and(|o| o.status.success())
    };
    let system = PathBuf::from("python3");
    if imports(&system, None) {
        return (system, None);
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::create_dir_all(&target).unwrap();
    // One provisioning at a time across test threads and processes.
    let lock = std::fs::File::create(target.join(format!("{package}.lock"))).unwrap();
    lock.lock().unwrap();
    let venv = target.join(format!("{package}-venv"));
    let venv_py = venv.join("bin/python");
    let site = target.join(format!("{package}-site"));
    if imports(&venv_py, None) {
        return (venv_py, None);
    }
    if imports(&system, Some(&site)) {
        return (system, Some(site));
    }
    let run = |cmd: &mut Command| cmd.status().is_ok_and(|s| s.success());
    let venv_ok = run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
        && run(Command::new(&venv_py).args(["-m", "pip", "install", "--quiet", package]));
    if venv_ok && imports(&venv_py, None) {
        return (venv_py, None);
    }
    let pip_ok = run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&site)
        .arg(package));
    assert!(
        pip_ok && imports(&system, Some(&site)),
        "no {package}: python3 lacks it and neither a venv under {} nor `pip install --target` could provide it",
        target.display()
    );
    (system, Some(site))
}
