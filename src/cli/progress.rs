//! What a running job shows on stderr: a progress bar on a terminal (log
//! lines are printed above it, never onto it), else a progress log line on
//! a timer, whether or not a record finished in between.

use crate::job;
use std::io::{IsTerminal, Write};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bar being drawn, if any: the log writer suspends it while a log
/// line is written.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// stderr for tracing: writes above the progress bar when one is drawn.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf).map(|_| buf.len())),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Counts since the run started.
#[derive(Default)]
struct Counts {
    rows: u64,
    tokens: u64,
    total: u64,
    start: Option<Instant>,
}

impl Counts {
    fn log(&self) {
        let el = self
            .start
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(1e-9);
        let eta = match self.rows {
            0 => "unknown".to_string(),
            r => format!("{:.0}", self.total.saturating_sub(r) as f64 * el / r as f64),
        };
        tracing::info!(
            records = self.rows,
            of = self.total,
            tok_s = format!("{:.0}", self.tokens as f64 / el),
            eta_s = eta,
            "progress"
        );
    }
}

/// A progress bar on a terminal, else a log line every `every`.
pub struct Progress {
    every: Duration,
    counts: Arc<Mutex<Counts>>,
    ticker: Mutex<Option<(Sender<()>, std::thread::JoinHandle<()>)>>,
}

impl Progress {
    /// Logs every `every` when stderr is not a terminal.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            counts: Arc::default(),
            ticker: Mutex::new(None),
        }
    }

    fn stop_ticker(&self) {
        if let Some((tx, handle)) = self.ticker.lock().expect("progress lock").take() {
            drop(tx);
            let _ = handle.join();
        }
    }

    fn start_ticker(&self) {
        self.stop_ticker();
        let (tx, rx) = channel::<()>();
        let (counts, every) = (Arc::clone(&self.counts), self.every);
        let handle = std::thread::spawn(move || loop {
            match rx.recv_timeout(every) {
                Err(RecvTimeoutError::Timeout) => counts.lock().expect("progress lock").log(),
                _ => return,
            }
        });
        *self.ticker.lock().expect("progress lock") = Some((tx, handle));
    }
}

impl job::Progress for Progress {
    fn start(&self, total: u64) {
        *self.counts.lock().expect("progress lock") = Counts {
            total,
            start: Some(Instant::now()),
            ..Counts::default()
        };
        if std::io::stderr().is_terminal() {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} records  {msg}  eta {eta}",
                )
                .expect("valid template"),
            );
            *BAR.lock().expect("bar lock") = Some(b);
        } else {
            self.start_ticker();
        }
    }

    fn row(&self, tokens: u64) {
        let mut c = self.counts.lock().expect("progress lock");
        c.rows += 1;
        c.tokens += tokens;
        if let Some(b) = &*BAR.lock().expect("bar lock") {
            let el = c.start.map_or(0.0, |s| s.elapsed().as_secs_f64()).max(1e-9);
            b.inc(1);
            b.set_message(format!("{:.0} tok/s", c.tokens as f64 / el));
        }
    }

    fn finish(&self) {
        if let Some(b) = BAR.lock().expect("bar lock").take() {
            b.finish_and_clear();
        }
        self.stop_ticker();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        job::Progress::finish(self);
    }
}
