//! Where a forward's device time goes: marks between its kernel classes
//! (CUDA events on the device's stream; wall time on the CPU, whose ops run
//! synchronously), added up per step kind for `runner bench --breakdown`.
//! An event times the stream, so on a GPU that is busy the time between
//! two marks is the device time of the kernels queued between them; a gap
//! where the GPU waited for the host is charged to the class after it.

use crate::Result;
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

enum Stamp {
    Wall(Instant),
    Cuda(crate::cuda::Event),
}

impl Stamp {
    fn now(dev: &Device) -> Result<Self> {
        Ok(match dev {
            Device::Cuda(_) => Stamp::Cuda(crate::cuda::record_event(dev)?),
            _ => Stamp::Wall(Instant::now()),
        })
    }

    fn ms_until(&self, end: &Stamp) -> Result<f64> {
        Ok(match (self, end) {
            (Stamp::Cuda(a), Stamp::Cuda(b)) => a.elapsed_ms(b)?,
            (Stamp::Wall(a), Stamp::Wall(b)) => (*b - *a).as_secs_f64() * 1e3,
            _ => 0.0,
        })
    }
}

/// Marks of one forward (off: every call is a no-op).
pub struct Timeline {
    dev: Option<Device>,
    start: Option<Stamp>,
    marks: Vec<(&'static str, Stamp)>,
}

impl Timeline {
    /// A timeline that records nothing.
    pub fn off() -> Self {
        Self {
            dev: None,
            start: None,
            marks: Vec::new(),
        }
    }

    /// A timeline on `dev`, started now.
    pub fn on(dev: &Device) -> Result<Self> {
        Ok(Self {
            start: Some(Stamp::now(dev)?),
            dev: Some(dev.clone()),
            marks: Vec::with_capacity(512),
        })
    }

    /// The work queued since the previous mark belongs to `class`.
    pub fn mark(&mut self, class: &'static str) -> Result<()> {
        if let Some(dev) = &self.dev {
            self.marks.push((class, Stamp::now(dev)?));
        }
        Ok(())
    }

    /// Milliseconds per class (waits for the device).
    pub fn finish(self) -> Result<BTreeMap<&'static str, f64>> {
        let mut out = BTreeMap::new();
        let Some(mut prev) = self.start else {
            return Ok(out);
        };
        for (class, stamp) in self.marks {
            *out.entry(class).or_insert(0.0) += prev.ms_until(&stamp)?;
            prev = stamp;
        }
        Ok(out)
    }
}

/// The device's idle time between forwards, measured without waiting for
/// it (`RUNNER_GPU_GAPS=1`, a diagnostic): an event where each forward
/// starts and one where it ends, read when the run is over. The time from
/// one forward's end to the next one's start is the pick (a few
/// microseconds of device work) and whatever the device waited for the
/// host. `RUNNER_PROFILE_STEPS=a-b` also puts forwards a..b (counted from
/// 0) between a profiler start and stop (`ncu --profile-from-start off`
/// then sees only their kernels) and logs each one's device time.
pub struct GapMeter {
    dev: Device,
    open: Option<Stamp>,
    steps: Vec<(Stamp, Stamp)>,
    profile: Option<(usize, usize)>,
    probe: bool,
}

/// The variable that turns the [`GapMeter`] on.
pub const GAPS_ENV: &str = "RUNNER_GPU_GAPS";
/// The variable that names the forwards to profile (`a-b`, `b` excluded).
pub const PROFILE_ENV: &str = "RUNNER_PROFILE_STEPS";
/// With [`PROFILE_ENV`], `1` also times each profiled forward eagerly and
/// from a CUDA graph before it runs (`Mistral::probe_graph`).
pub const PROBE_ENV: &str = "RUNNER_GRAPH_PROBE";

/// `a-b` with a < b.
fn step_range(v: &str) -> Option<(usize, usize)> {
    let (a, b) = v.split_once('-')?;
    let (a, b) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
    (a < b).then_some((a, b))
}

impl GapMeter {
    /// A meter on `dev` when the environment asks for one.
    pub fn from_env(dev: &Device) -> Option<Self> {
        let profile = std::env::var(PROFILE_ENV).ok().map(|v| {
            let r = step_range(&v);
            if r.is_none() {
                tracing::warn!("{PROFILE_ENV}={v:?} ignored: expected a-b with a < b");
            }
            r
        });
        let on = std::env::var(GAPS_ENV).is_ok_and(|v| v == "1");
        (on || profile.is_some()).then(|| Self {
            dev: dev.clone(),
            open: None,
            steps: Vec::new(),
            profile: profile.flatten(),
            probe: std::env::var(PROBE_ENV).is_ok_and(|v| v == "1"),
        })
    }

    /// Whether the next forward is one to probe with a graph.
    pub fn probe_now(&self) -> bool {
        self.probe
            && self
                .profile
                .is_some_and(|(a, b)| (a..b).contains(&self.steps.len()))
    }

    /// A forward is about to be queued.
    pub fn begin(&mut self) -> Result<()> {
        if self.profile.is_some_and(|(a, _)| a == self.steps.len()) {
            self.profiler(true);
        }
        self.open = Some(Stamp::now(&self.dev)?);
        Ok(())
    }

    /// The forward begun last is queued.
    pub fn end(&mut self) -> Result<()> {
        if let Some(start) = self.open.take() {
            self.steps.push((start, Stamp::now(&self.dev)?));
        }
        if self.profile.is_some_and(|(_, b)| b == self.steps.len()) {
            self.profiler(false);
        }
        Ok(())
    }

    /// Starts or stops the profiler; a failure (no CUDA device) is logged,
    /// not raised: the meter is a diagnostic and must not stop a job.
    fn profiler(&self, on: bool) {
        if let Err(e) = crate::cuda::profiler(&self.dev, on) {
            tracing::warn!("{PROFILE_ENV}: {e}");
        }
    }

    /// (forwards, their device milliseconds, the milliseconds between
    /// them); waits for the device. Logs the profiled forwards' own times.
    pub fn totals(&self) -> Result<(usize, f64, f64)> {
        let (mut busy, mut gaps) = (0.0, 0.0);
        for (i, (a, b)) in self.steps.iter().enumerate() {
            let ms = a.ms_until(b)?;
            busy += ms;
            if let Some((next, _)) = self.steps.get(i + 1) {
                gaps += b.ms_until(next)?;
            }
            if self.profile.is_some_and(|(a, b)| (a..b).contains(&i)) {
                tracing::info!(forward = i, device_ms = ms, "profiled forward");
            }
        }
        Ok((self.steps.len(), busy, gaps))
    }
}

/// Device time per kernel class, added up over the steps of each kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Breakdown {
    /// `decode` (every chunk one token), `prefill` (no one-token chunk) or
    /// `mixed`.
    pub kinds: BTreeMap<String, KindTimes>,
}

/// The steps of one kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindTimes {
    /// Steps timed.
    pub steps: usize,
    /// Tokens they ran.
    pub tokens: usize,
    /// Sequences (chunks) they ran.
    pub seqs: usize,
    /// Milliseconds per kernel class.
    pub ms: BTreeMap<String, f64>,
    /// Wall milliseconds from the start of each step of this kind to the
    /// start of the next step (the device time, then the host's work
    /// after it and before the next forward), over `periods` steps (the
    /// last step of a run has none).
    #[serde(default)]
    pub period_ms: f64,
    /// Steps with a period.
    #[serde(default)]
    pub periods: usize,
    /// Host wall milliseconds per phase of the engine's step (schedule,
    /// commit, pick, update, rows), over `steps` steps. With the breakdown
    /// on, the forward has finished before the pick (its timeline waits
    /// for the device), so these are the host's own work.
    #[serde(default)]
    pub host_ms: BTreeMap<String, f64>,
}

impl Breakdown {
    /// Adds another run's (another engine's) times.
    pub fn absorb(&mut self, o: &Breakdown) {
        for (kind, t) in &o.kinds {
            let k = self.kinds.entry(kind.clone()).or_default();
            k.steps += t.steps;
            k.tokens += t.tokens;
            k.seqs += t.seqs;
            k.period_ms += t.period_ms;
            k.periods += t.periods;
            for (phase, ms) in &t.host_ms {
                *k.host_ms.entry(phase.clone()).or_insert(0.0) += ms;
            }
            for (class, ms) in &t.ms {
                *k.ms.entry(class.clone()).or_insert(0.0) += ms;
            }
        }
    }

    /// The kind of a step of `chunk_lens`.
    pub fn kind(chunk_lens: &[usize]) -> &'static str {
        match (chunk_lens.iter().all(|&l| l == 1), chunk_lens.contains(&1)) {
            (true, _) => "decode",
            (false, false) => "prefill",
            (false, true) => "mixed",
        }
    }

    /// Adds the wall period of one step of `kind` (see
    /// [`KindTimes::period_ms`]).
    pub fn add_period(&mut self, kind: &str, ms: f64) {
        let k = self.kinds.entry(kind.into()).or_default();
        k.period_ms += ms;
        k.periods += 1;
    }

    /// Adds host wall milliseconds of one step of `kind` per phase.
    pub fn add_host(&mut self, kind: &str, phases: &[(&'static str, f64)]) {
        let k = self.kinds.entry(kind.into()).or_default();
        for (phase, ms) in phases {
            *k.host_ms.entry((*phase).into()).or_insert(0.0) += ms;
        }
    }

    /// Adds one step of `chunk_lens` with its class times.
    pub fn add(&mut self, chunk_lens: &[usize], times: BTreeMap<&'static str, f64>) {
        let k = self.kinds.entry(Self::kind(chunk_lens).into()).or_default();
        k.steps += 1;
        k.tokens += chunk_lens.iter().sum::<usize>();
        k.seqs += chunk_lens.len();
        for (class, ms) in times {
            *k.ms.entry(class.into()).or_insert(0.0) += ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_split_the_time_between_classes_and_steps_add_up_by_kind() {
        let mut t = Timeline::on(&Device::Cpu).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        t.mark("a").unwrap();
        t.mark("b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        t.mark("a").unwrap();
        let times = t.finish().unwrap();
        assert!(times["a"] >= 9.0 && times["b"] < 1.0, "{times:?}");
        let mut b = Breakdown::default();
        b.add(&[1, 1, 1], times.clone());
        b.add(&[1, 1], times.clone());
        b.add(&[7, 1], times);
        assert_eq!(b.kinds["decode"].steps, 2);
        assert_eq!(b.kinds["decode"].seqs, 5);
        assert_eq!(b.kinds["mixed"].tokens, 8);
        assert!(b.kinds["decode"].ms["a"] >= 18.0);
        b.add_period("decode", 12.0);
        b.add_period("decode", 14.0);
        assert_eq!(b.kinds["decode"].periods, 2);
        assert_eq!(b.kinds["decode"].period_ms, 26.0);
        let mut all = Breakdown::default();
        all.absorb(&b);
        all.absorb(&b);
        assert_eq!(
            (all.kinds["decode"].periods, all.kinds["mixed"].steps),
            (4, 2)
        );
        assert!(Timeline::off().finish().unwrap().is_empty());
    }

    #[test]
    fn a_profile_range_is_a_to_b_with_a_below_b() {
        assert_eq!(step_range("20-23"), Some((20, 23)));
        assert_eq!(step_range(" 0 - 1"), Some((0, 1)));
        assert_eq!(step_range("5-5"), None);
        assert_eq!(step_range("7"), None);
        assert_eq!(step_range("a-3"), None);
    }
}
