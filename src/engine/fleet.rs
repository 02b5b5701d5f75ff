//! Several engines, one per device, over one job: threads of this process
//! (not child processes), so that one reader feeds them and one sink writes
//! the job's one output, with no IPC. Each device has its own CUDA context,
//! so a fault on one leaves the others running.
//!
//! Work is handed out on demand: each engine's reader thread pulls the
//! next record from the shared input when its queue has room, so a faster
//! device, or one with shorter records, takes more. When a device fails
//! mid-run (a device error), the records it had taken and not finished go
//! back to the queue and the other engines run them; rows it wrote stay.

use super::{Engine, JobSummary};
use crate::config::{Device, GenerationParams, JobSpec};
use crate::input::InputRecord;
use crate::model::HubSettings;
use crate::output::{JobMeta, OutputRow, RowSink};
use crate::{Error, Result};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The input shared by the engines of a fleet.
pub type SharedInput<'a> = dyn Iterator<Item = Result<InputRecord>> + Send + 'a;

/// One engine per device.
pub struct Fleet {
    engines: Vec<(Device, Engine)>,
    stop: Arc<AtomicBool>,
}

/// What a fleet's run did.
#[derive(Debug, Default)]
pub struct FleetSummary {
    /// The engines' figures, added up (wall time: the longest).
    pub summary: JobSummary,
    /// Devices that failed, with their errors.
    pub failed: Vec<(Device, Error)>,
    /// Records a failed device had taken and the others ran again.
    pub handed_back: usize,
}

impl FleetSummary {
    /// The error a run with failed devices ends with (exit code 4), saying
    /// whether every record was still written.
    pub fn device_error(&self, complete: bool) -> Option<Error> {
        let (first, rest) = self.failed.split_first()?;
        let names: Vec<String> = self.failed.iter().map(|(d, _)| d.to_string()).collect();
        let outcome = match complete {
            true => format!(
                "the {} unfinished records it held were run on the other devices; every record is written",
                self.handed_back
            ),
            false => "records not written are run by the next submit of the job".into(),
        };
        let why = match &first.1 {
            Error::Device(m) => m.clone(),
            other => other.to_string(),
        };
        Some(Error::Device(format!(
            "device(s) {} failed ({why}{}); {outcome}",
            names.join(", "),
            match rest.len() {
                0 => String::new(),
                n => format!("; and {n} more"),
            }
        )))
    }
}

impl Fleet {
    /// Loads one engine per device, side by side. The meta is the first's.
    pub fn load(spec: &JobSpec, hub: &HubSettings, devices: &[Device]) -> Result<(Self, JobMeta)> {
        let loaded = Self::on_each(spec, devices, |one| Engine::load(one, hub));
        let mut engines = Vec::new();
        let mut meta = None;
        for (d, (e, m)) in loaded? {
            meta.get_or_insert(m);
            engines.push((d, e));
        }
        let meta = meta.ok_or_else(|| Error::Config("engine.devices is empty".into()))?;
        Ok((Self::from_engines(engines), meta))
    }

    /// `build` run for each device side by side (threads), on the job with
    /// `engine.device` set to it; a panic is that device's failure.
    pub fn on_each<T: Send>(
        spec: &JobSpec,
        devices: &[Device],
        build: impl Fn(&JobSpec) -> Result<T> + Sync,
    ) -> Result<Vec<(Device, T)>> {
        let built: Vec<Result<T>> = std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .map(|&d| {
                    let mut one = spec.clone();
                    one.engine.device = d;
                    let build = &build;
                    s.spawn(move || build(&one))
                })
                .collect();
            handles
                .into_iter()
                .zip(devices)
                .map(|(h, &d)| h.join().unwrap_or_else(|p| Err(panicked(d, &*p))))
                .collect()
        });
        devices
            .iter()
            .zip(built)
            .map(|(&d, r)| r.map(|t| (d, t)))
            .collect()
    }

    /// A fleet of engines already built, one per device. With several,
    /// each reads ahead and keeps waiting only a quarter of its
    /// `max_num_seqs` (at least 4) records: enough to fill the slots that
    /// free up between steps, and little to strand on one device when the
    /// input runs out (it holds at most its running records plus about
    /// three quarters of `max_num_seqs` more).
    pub fn from_engines(engines: Vec<(Device, Engine)>) -> Self {
        let several = engines.len() > 1;
        let engines = engines
            .into_iter()
            .enumerate()
            .map(|(k, (d, mut e))| {
                e.worker = k;
                if several {
                    e.window = Some((e.sched.max_num_seqs / 4).max(4));
                }
                (d, e)
            })
            .collect();
        Self {
            engines,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Its devices.
    pub fn devices(&self) -> Vec<Device> {
        self.engines.iter().map(|(d, _)| *d).collect()
    }

    /// Stops every engine (after its current step) once `flag` is set.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        for (_, e) in &mut self.engines {
            e.set_stop_flag(Arc::clone(&flag));
        }
        self.stop = flag;
    }

    /// The engines.
    pub fn engines(&self) -> impl Iterator<Item = &Engine> {
        self.engines.iter().map(|(_, e)| e)
    }

    /// Runs every record of `input` on the engines and writes their rows
    /// to `sink`. With several engines a device error stops that engine
    /// only (see [`FleetSummary::failed`]); any other error stops them all
    /// and is returned. The sink is flushed in every case: the rows of
    /// records that finished are written.
    pub fn run(
        &mut self,
        input: &mut SharedInput<'_>,
        job_system: &str,
        defaults: &GenerationParams,
        sink: &mut (dyn RowSink + Send),
    ) -> Result<FleetSummary> {
        if self.engines.iter().any(|(_, e)| e.stop.is_none()) {
            let flag = Arc::clone(&self.stop);
            self.set_stop_flag(flag);
        }
        let start = std::time::Instant::now();
        // With one engine a device error ends the run (nothing to hand to).
        let tracked = self.engines.len() > 1;
        let hand = Handout::new(input, defaults, self.engines.len(), tracked);
        let sink = Mutex::new(sink);
        let mut out = FleetSummary::default();
        let mut healthy: Vec<usize> = (0..self.engines.len()).collect();
        let mut fatal = None;
        // A round runs every healthy engine until the input is drained; a
        // device that fails hands its records back, which another round
        // runs when the others had already finished.
        while !healthy.is_empty() && fatal.is_none() {
            for &k in &healthy {
                hand.pushed(k); // each round counts afresh
            }
            let results = self.round(&healthy, &hand, &sink, job_system);
            for (k, r) in healthy.clone().into_iter().zip(results) {
                match r {
                    Ok(s) => {
                        tracing::info!(device = %self.engines[k].0, engine = k, records = s.records, steps = s.steps, "engine finished");
                        out.summary.absorb(&s)
                    }
                    Err(Error::Device(m)) if tracked => {
                        out.summary.absorb(&hand.pushed(k));
                        let back = hand.give_back(k);
                        tracing::error!(device = %self.engines[k].0, records_handed_back = back, "device failed: {m}");
                        out.handed_back += back;
                        out.failed.push((self.engines[k].0, Error::Device(m)));
                        healthy.retain(|&h| h != k);
                    }
                    Err(e) => {
                        fatal.get_or_insert(e);
                    }
                }
            }
            if !hand.has_handed_back() || out.summary.interrupted {
                break;
            }
        }
        // A sink poisoned by a panic mid-write is not flushed again (its
        // buffer may already be in a part).
        let flushed = match sink.into_inner() {
            Ok(sink) => sink.flush(),
            Err(_) => Err(poisoned()),
        };
        out.summary.wall_s = start.elapsed().as_secs_f64();
        match fatal {
            Some(e) => Err(e),
            None => flushed.map(|()| out),
        }
    }

    /// Runs the engines `which` side by side, each in its thread.
    fn round(
        &self,
        which: &[usize],
        hand: &Handout<'_, '_>,
        sink: &Mutex<&mut (dyn RowSink + Send)>,
        job_system: &str,
    ) -> Vec<Result<JobSummary>> {
        std::thread::scope(|s| {
            let handles: Vec<_> =
                which
                    .iter()
                    .map(|&k| {
                        let engine = &self.engines[k].1;
                        let stop = &self.stop;
                        s.spawn(move || {
                        let mut input = Taker { hand, worker: k };
                        let mut out = SharedSink { sink, hand, worker: k };
                        let r = engine.run(&mut input, job_system, &mut out);
                        // Any error but a device's (with others to take
                        // over) stops every engine now.
                        if matches!(&r, Err(e) if !matches!(e, Error::Device(_)) || !hand.tracked) {
                            stop.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                    })
                    .collect();
            handles
                .into_iter()
                .zip(which)
                .map(|(h, &k)| {
                    h.join()
                        .unwrap_or_else(|p| Err(panicked(self.engines[k].0, &*p)))
                })
                .collect()
        })
    }
}

/// A panic in an engine's thread, as a failure of its device: the panic
/// stayed in that thread, so the fleet hands its records to the others
/// (CUDA errors that the bindings raise as panics land here).
fn panicked(device: Device, payload: &(dyn std::any::Any + Send)) -> Error {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("no message");
    Error::Device(format!("the engine on {device} panicked: {msg}"))
}

impl JobSummary {
    /// Adds another engine's figures (wall time and peak memory: the largest).
    pub fn absorb(&mut self, o: &JobSummary) {
        self.records += o.records;
        self.ok += o.ok;
        self.errors += o.errors;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.steps += o.steps;
        self.wall_s = self.wall_s.max(o.wall_s);
        self.prefix_hit_tokens += o.prefix_hit_tokens;
        self.cached_prompt_tokens += o.cached_prompt_tokens;
        self.preemptions += o.preemptions;
        self.peak_device_bytes = match (self.peak_device_bytes, o.peak_device_bytes) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.forward_tokens += o.forward_tokens;
        self.prefill_tokens += o.prefill_tokens;
        self.interrupted |= o.interrupted;
        if let Some(b) = &o.breakdown {
            self.breakdown
                .get_or_insert_with(Default::default)
                .absorb(b);
        }
    }
}

/// Record id -> (the record as taken, sample indices written since).
type Held = HashMap<String, (InputRecord, Vec<u32>)>;

/// The shared input, the records handed back by failed devices, and (with
/// several engines) what each engine holds unfinished.
struct Handout<'i, 'a> {
    input: Mutex<&'i mut SharedInput<'a>>,
    back: Mutex<VecDeque<InputRecord>>,
    /// Per engine: what it took and has not finished.
    held: Vec<Mutex<Held>>,
    /// Per engine: the rows it handed to the sink in this round (the
    /// figures of an engine that fails, whose own summary is lost).
    pushed: Vec<Mutex<JobSummary>>,
    defaults: &'i GenerationParams,
    tracked: bool,
}

impl<'i, 'a> Handout<'i, 'a> {
    fn new(
        input: &'i mut SharedInput<'a>,
        defaults: &'i GenerationParams,
        engines: usize,
        tracked: bool,
    ) -> Self {
        Self {
            input: Mutex::new(input),
            back: Mutex::new(VecDeque::new()),
            held: (0..engines).map(|_| Mutex::default()).collect(),
            pushed: (0..engines).map(|_| Mutex::default()).collect(),
            defaults,
            tracked,
        }
    }

    fn next(&self, worker: usize) -> Option<Result<InputRecord>> {
        let popped = self.back.lock().expect("handout lock").pop_front();
        let item = match popped {
            Some(r) => Some(Ok(r)),
            None => self.input.lock().expect("input lock").next(),
        };
        if let (true, Some(Ok(r))) = (self.tracked, &item) {
            let held = (r.clone(), Vec::new());
            self.held[worker]
                .lock()
                .expect("handout lock")
                .insert(r.id.clone(), held);
        }
        item
    }

    /// Sample `sample` of record `id`, run by `worker`, is in the sink.
    fn written(&self, worker: usize, id: &str, sample: u32) {
        if !self.tracked {
            return;
        }
        let mut held = self.held[worker].lock().expect("handout lock");
        let Some((rec, since)) = held.get_mut(id) else {
            return;
        };
        since.push(sample);
        let pending = rec.pending_samples(self.defaults);
        if pending.iter().all(|i| since.contains(i)) {
            held.remove(id);
        }
    }

    /// Puts `worker`'s unfinished records back in the queue; how many.
    fn give_back(&self, worker: usize) -> usize {
        let held = std::mem::take(&mut *self.held[worker].lock().expect("handout lock"));
        let mut back = self.back.lock().expect("handout lock");
        let n = held.len();
        let mut recs: Vec<InputRecord> = held
            .into_values()
            .map(|(mut rec, since)| {
                rec.written_samples.extend(since);
                rec
            })
            .collect();
        recs.sort_by_key(|r| r.row);
        back.extend(recs);
        n
    }

    /// The figures of the rows `worker` handed to the sink so far (taken:
    /// the next round counts afresh).
    fn pushed(&self, worker: usize) -> JobSummary {
        std::mem::take(&mut *self.pushed[worker].lock().expect("handout lock"))
    }

    /// Counts a row `worker` handed to the sink.
    fn count(&self, worker: usize, row: &OutputRow) {
        if !self.tracked {
            return; // one engine: its own summary has these
        }
        let mut p = self.pushed[worker].lock().expect("handout lock");
        p.records += 1;
        match row.status {
            crate::output::RowStatus::Ok => p.ok += 1,
            _ => p.errors += 1,
        }
        p.prompt_tokens += row.prompt_tokens as usize;
        p.completion_tokens += row.completion_tokens as usize;
    }

    fn has_handed_back(&self) -> bool {
        !self.back.lock().expect("handout lock").is_empty()
    }
}

/// One engine's view of the shared input.
struct Taker<'h, 'i, 'a> {
    hand: &'h Handout<'i, 'a>,
    worker: usize,
}

impl Iterator for Taker<'_, '_, '_> {
    type Item = Result<InputRecord>;
    fn next(&mut self) -> Option<Self::Item> {
        self.hand.next(self.worker)
    }
}

/// One engine's view of the shared sink.
struct SharedSink<'h, 'i, 'a, 's> {
    sink: &'h Mutex<&'s mut (dyn RowSink + Send)>,
    hand: &'h Handout<'i, 'a>,
    worker: usize,
}

impl<'h, 's> SharedSink<'h, '_, '_, 's> {
    /// The sink; an error (fatal to the run) when a panic poisoned it.
    fn lock(&self) -> Result<std::sync::MutexGuard<'h, &'s mut (dyn RowSink + Send)>> {
        self.sink.lock().map_err(|_| poisoned())
    }
}

impl RowSink for SharedSink<'_, '_, '_, '_> {
    fn push(&mut self, row: OutputRow) -> Result<()> {
        self.hand.count(self.worker, &row);
        let (id, sample) = (row.id.clone(), row.sample_index);
        self.lock()?.push(row)?;
        self.hand.written(self.worker, &id, sample);
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.lock()?.flush()
    }
    fn tick(&mut self) -> Result<()> {
        self.lock()?.tick()
    }
}

fn poisoned() -> Error {
    Error::Output(
        "the output sink was left poisoned by a panic while writing; rerun the job to resume"
            .into(),
    )
}
