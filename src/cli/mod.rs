//! Command-line verbs. This is the only layer that reads the environment;
//! everything below receives resolved settings.

mod bench;
mod inspect;
mod progress;
mod submit;

pub use progress::LogWriter;

use crate::config::{self, JobSpec, Overrides};
use crate::model::HubSettings;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

/// Offline batch text generation for Mistral-7B-OpenOrca GPTQ checkpoints.
#[derive(Debug, Parser)]
#[command(name = "runner", version, about)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a job: read its prompts, generate, write Parquet.
    Submit {
        /// The job file (TOML).
        job: PathBuf,
        /// Override a setting, e.g. --set engine.device=cuda (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Discard an output written by a different job (or by this one) and start over.
        #[arg(long)]
        restart: bool,
        #[command(flatten)]
        shard: ShardArgs,
        /// When stderr is not a terminal: seconds between progress log lines.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = positive_seconds)]
        progress_every: f64,
    },
    /// Rebuild a sweep's report.md / report.parquet from its variants' data.
    Report {
        /// The sweep's output directory.
        output: PathBuf,
    },
    /// Compact a job's part files into one Parquet file in input order.
    Merge {
        /// The job's output directory.
        output: PathBuf,
        /// The merged file (default: `<output>.parquet` beside the directory).
        #[arg(long, short)]
        into: Option<PathBuf>,
    },
    /// Write a job's rows in another format: `--format openai_batch`, one
    /// OpenAI Batch API output line per record (to standard output, or
    /// `--output FILE`).
    Export {
        /// The job's output directory.
        #[arg(value_name = "OUT")]
        dir: PathBuf,
        /// The format (`openai_batch`).
        #[arg(long, value_parser = ["openai_batch"])]
        format: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Directory with tokenizer.json, to name the tokens of `logprobs`
        /// (default: the job's model directory).
        #[arg(long, value_name = "DIR")]
        tokenizer: Option<PathBuf>,
    },
    /// Print the progress and figures of a job's output directory (running, finished or dead).
    Status {
        /// The job's output directory.
        output: PathBuf,
    },
    /// Resolve and check a job without loading weights; print the resolved job.
    Validate {
        /// The job file (TOML).
        job: PathBuf,
        #[command(flatten)]
        shard: ShardArgs,
        /// Override a setting (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Benchmarks: workloads W1-W4 on dummy weights of the job's model
    /// config, and (CUDA) the kernel benches. See BENCHMARKS.md.
    Bench {
        /// The job file whose model config and engine settings to use.
        job: PathBuf,
        /// Workloads to run (W1..W4, comma-separated); none = kernels only.
        #[arg(long, value_delimiter = ',')]
        workload: Vec<String>,
        /// Fraction of each workload's prompts (quick runs).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Directory with tokenizer.json (default: the model directory).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Also run the GEMM and attention kernel benches (CUDA).
        #[arg(long)]
        kernels: bool,
        /// With --kernels: the GPTQ product bench only.
        #[arg(long, requires = "kernels")]
        gemm_only: bool,
        /// With --kernels: the token counts M of the GPTQ product bench
        /// (default: 1, 4, 8, 16, 32, 64, 128, 256, 1024, 4096).
        #[arg(long, requires = "kernels", value_delimiter = ',')]
        gemm_m: Vec<usize>,
        /// With --kernels: the GPTQ product bench's shapes by name (q/o,
        /// k/v, gate/up, down, qkv fused, gate+up; default: all).
        #[arg(long, requires = "kernels", value_delimiter = ',')]
        gemm_shapes: Vec<String>,
        /// Time every algorithm cuBLASLt offers for Mistral-7B's products
        /// at these token counts, beside cuBLAS's own choice (CUDA).
        #[arg(long, value_delimiter = ',')]
        gemm_lt: Vec<usize>,
        /// Time each kernel class of every step of the workloads (CUDA
        /// events between classes) and print where a decode and a prefill
        /// step's device time goes.
        #[arg(long)]
        breakdown: bool,
        /// Write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Override a setting (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print a model's architecture, quantization and tensor inventory.
    Inspect {
        /// A local model directory or a hub repo id.
        model: String,
        /// Hub revision (quant branch) for a repo id.
        #[arg(long, default_value = "main")]
        revision: String,
    },
}

/// A number of seconds > 0.
fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("`{s}` is not a number of seconds > 0")),
    }
}

/// Which static shard of the job's records a run writes.
#[derive(Debug, clap::Args)]
struct ShardArgs {
    /// Run only shard I of N (`I/N`, 0-based: the records whose id hashes
    /// to I), or `auto`: from SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT
    /// or Kubernetes' JOB_COMPLETION_INDEX (with --shard-count).
    #[arg(long, value_name = "I/N|auto")]
    shard: Option<String>,
    /// The shard count for `--shard auto` when the environment gives only
    /// an index (default: output.shard_count).
    #[arg(long, value_name = "N", requires = "shard")]
    shard_count: Option<usize>,
}

impl ShardArgs {
    /// The job with its shard set.
    fn apply(&self, mut spec: JobSpec) -> anyhow::Result<JobSpec> {
        let Some(arg) = &self.shard else {
            return Ok(spec);
        };
        if spec.sweep.is_some() {
            return Err(crate::Error::Config(
                "--shard with a [sweep] job: not supported; shard each variant as a plain job (model.revision per job)".into(),
            )
            .into());
        }
        let shard = if arg == "auto" {
            let count = self
                .shard_count
                .or((spec.output.shard_count > 0).then_some(spec.output.shard_count));
            let (s, from) = crate::job::shards::shard_from_env(&|k| std::env::var(k).ok(), count)?;
            tracing::info!(shard = %s, "--shard auto: {from}");
            s
        } else {
            crate::output::Shard::parse(arg)?
        };
        spec.shard = Some(shard);
        Ok(spec)
    }
}

/// Runs the parsed command.
pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Submit {
            job,
            set,
            restart,
            shard,
            progress_every,
        } => {
            let every = std::time::Duration::from_secs_f64(progress_every);
            let spec = shard.apply(load_job(&job, set)?)?;
            submit::submit(&spec, &hub_settings(), restart, every).map_err(submit::with_resume_hint)
        }
        Command::Status { output } => submit::status(&output),
        Command::Report { output } => Ok(crate::job::sweep::write_report(&output)?),
        Command::Merge { output, into } => {
            for f in crate::job::merge(&output, into.as_deref())? {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Export {
            dir,
            format: _,
            output,
            tokenizer,
        } => export(&dir, output.as_deref(), tokenizer.as_deref()),
        Command::Validate { job, shard, set } => {
            submit::validate(&shard.apply(load_job(&job, set)?)?, &hub_settings())
        }
        Command::Bench {
            job,
            workload,
            scale,
            tokenizer,
            kernels,
            gemm_only,
            gemm_m,
            gemm_shapes,
            gemm_lt,
            breakdown,
            json,
            set,
        } => {
            let spec = load_job(&job, set)?;
            let tok = tokenizer
                .or_else(|| spec.model.local_dir.clone())
                .unwrap_or_else(|| PathBuf::from("."));
            bench::bench(
                &spec,
                &bench::BenchArgs {
                    workloads: &workload,
                    scale,
                    tokenizer: &tok,
                    kernels,
                    gemm_only,
                    gemm_m: &gemm_m,
                    gemm_shapes: &gemm_shapes,
                    gemm_lt: &gemm_lt,
                    breakdown,
                    json: json.as_deref(),
                },
            )
        }
        Command::Inspect { model, revision } => {
            inspect::inspect(&model, &revision, &hub_settings())
        }
    }
}

fn load_job(job: &std::path::Path, set: Vec<String>) -> crate::Result<JobSpec> {
    let env = std::env::vars()
        .filter(|(k, _)| k.starts_with("RUNNER_"))
        .collect();
    config::load(job, &Overrides { env, set })
}

/// `HF_HOME`, `HF_HUB_OFFLINE`, `HF_TOKEN` from the environment.
pub fn hub_settings() -> HubSettings {
    let truthy = |v: String| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on");
    HubSettings {
        cache_dir: std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub"))),
        offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(truthy),
        token: std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()),
    }
}

/// `runner export`: the lines to standard output, or atomically to a file.
fn export(dir: &Path, output: Option<&Path>, tokenizer: Option<&Path>) -> anyhow::Result<()> {
    match output {
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            crate::job::export_openai_batch(dir, tokenizer, &mut w)?;
            std::io::Write::flush(&mut w)?;
        }
        Some(file) => {
            let mut buf = Vec::new();
            let n = crate::job::export_openai_batch(dir, tokenizer, &mut buf)?;
            crate::output::write_atomic_path(file, &buf)?;
            tracing::info!(lines = n, file = %file.display(), "exported");
        }
    }
    Ok(())
}
