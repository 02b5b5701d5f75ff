//! `_metrics.json`: one typed struct that the writer, `runner status` and
//! the sweep report share.

use super::manifest::Manifest;
use super::JobState;
use crate::engine::JobSummary;
use crate::output::{write_atomic, Layout};
use crate::Result;
use serde::{Deserialize, Serialize};

pub use crate::output::METRICS;

/// The job's figures over all its runs, and the last run's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Where the job stands.
    pub state: JobState,
    /// Records in the input.
    pub total_records: usize,
    /// Rows the finished job holds (records x their samples).
    #[serde(default)]
    pub total_rows: usize,
    /// Rows in the output.
    pub records_written: usize,
    /// Rows with status ok.
    pub ok: usize,
    /// Rows with status error.
    pub errors: usize,
    /// Prompt tokens of the rows.
    pub prompt_tokens: usize,
    /// Generated tokens of the rows.
    pub completion_tokens: usize,
    /// Part files.
    pub parts: usize,
    /// Generation wall time over all runs.
    pub wall_s: f64,
    /// completion_tokens / wall_s.
    pub output_tok_s: f64,
    /// When the manifest was last written (seconds since the epoch).
    pub updated_unix: u64,
    /// The last run, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<LastRun>,
}

/// Figures of one run: the engine's summary and the model's load time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRun {
    /// What the engine counted.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// Model load time.
    pub load_s: f64,
}

impl Metrics {
    /// The figures of a manifest, with the run that just ended if any.
    pub fn new(m: &Manifest, run: Option<(&JobSummary, f64)>) -> Self {
        let completion = m.sum(|p| p.completion_tokens);
        Self {
            state: m.state,
            total_records: m.total_records,
            total_rows: m.expected_rows(),
            records_written: m.rows(),
            ok: m.sum(|p| p.ok),
            errors: m.sum(|p| p.errors),
            prompt_tokens: m.sum(|p| p.prompt_tokens),
            completion_tokens: completion,
            parts: m.parts.len(),
            wall_s: m.wall_s,
            output_tok_s: completion as f64 / m.wall_s.max(1e-9),
            updated_unix: m.updated_unix,
            last_run: run.map(|(s, load_s)| LastRun {
                summary: s.clone(),
                load_s,
            }),
        }
    }

    /// Writes the layout's metrics file (`_metrics.json`) atomically.
    pub fn write(&self, files: &Layout) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("metrics serialize");
        write_atomic(&files.dir, &files.metrics_name(), &bytes)
    }

    /// Reads the layout's metrics file: `None` when absent, an error naming
    /// the file when it cannot be read or parsed (never zeros).
    pub fn read(files: &Layout) -> Result<Option<Self>> {
        super::manifest::read_json(&files.metrics(), "metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unreadable metrics file is an error naming it, never zeros
    /// (engine v2 issue, item 8); a missing one is `None`.
    #[test]
    fn unreadable_metrics_are_an_error_not_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let files = Layout::plain(dir.path());
        assert_eq!(Metrics::read(&files).unwrap(), None);
        std::fs::write(dir.path().join(METRICS), "{\"state\": \"finished\"").unwrap();
        let e = Metrics::read(&files).unwrap_err().to_string();
        assert!(
            e.contains("_metrics.json") && e.contains("unreadable"),
            "{e}"
        );
    }

    #[test]
    fn metrics_round_trip_with_the_last_run() {
        let m = Metrics {
            state: JobState::Finished,
            total_records: 3,
            total_rows: 3,
            records_written: 3,
            ok: 2,
            errors: 1,
            prompt_tokens: 30,
            completion_tokens: 12,
            parts: 1,
            wall_s: 2.0,
            output_tok_s: 6.0,
            updated_unix: 1,
            last_run: Some(LastRun {
                summary: JobSummary {
                    records: 3,
                    steps: 7,
                    peak_device_bytes: Some(1 << 30),
                    ..Default::default()
                },
                load_s: 0.5,
            }),
        };
        let dir = tempfile::tempdir().unwrap();
        let files = Layout::new(dir.path(), Some(crate::output::Shard::new(1, 3).unwrap()));
        m.write(&files).unwrap();
        assert!(dir.path().join("_metrics.shard-1-of-3.json").is_file());
        assert_eq!(Metrics::read(&files).unwrap(), Some(m));
    }
}
