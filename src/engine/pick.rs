//! Sampler picks: the next token of every sampling chunk, chosen on the
//! device where the backend samples there (CUDA): greedy argmax, top-k
//! candidates (k <= the backend's top-k), the top-p nucleus from the
//! row's best candidates and its normaliser, or the draw over the whole
//! row, each after the repetition penalty on the device. The host then
//! draws from the candidates with the record's RNG as from its own sorted
//! list (top-k: exactly; top-p: up to the order and rounding of the
//! normaliser's sum, which can move the cut only at a near-tie). A row
//! whose stop tokens `min_new_tokens` still masks is picked from a copy
//! with them at -inf (the host sampler's mask), on the device too. Else
//! (the CPU backend; top_k above the device's; a nucleus wider than the
//! candidates) the row's logits go to the host sampler.

use super::runner::StepLogits;
use super::update::StopRule;
use crate::config::GenerationParams;
use crate::sampler;
use crate::scheduler::{RequestKind, Scheduler, StepPlan};
use crate::Result;
use candle_core::{DType, Tensor};

/// A sampled token, or what to sample it from on the host.
#[derive(Debug, Clone)]
pub enum Picked {
    /// Chosen on the device without a uniform (greedy).
    Token(u32),
    /// Drawn on the device with the record's next uniform (which the host
    /// then consumes, so the record's stream stays the host sampler's).
    Drawn(u32),
    /// The row's logits, for the host sampler.
    Logits(Vec<f32>),
    /// The device's top-k `(token, logit / t)` in the host sampler's order.
    Candidates(Vec<(u32, f32)>),
    /// The device's best `(token, logit / t)` in the host sampler's order,
    /// holding the top-p nucleus, and the row's normaliser (its f64 sum,
    /// added in another order than the host's).
    Nucleus(Vec<(u32, f32)>, f64),
    /// A host row after [`sampler::prepare`] (set by the update, before
    /// the draw).
    Prepared(sampler::Prepared),
}

/// Candidates the top-p route takes per row: a real model's nucleus at
/// top_p 0.9-0.95 is mostly narrower; a wider one goes to the host, which
/// sorts only as much of the row as it needs. More would cost every row
/// their transfer and conversion each step.
const NUCLEUS_CANDIDATES: usize = 256;

#[derive(Debug, PartialEq)]
enum Route {
    Skip,
    DeviceArgmax,
    DeviceTopK,
    DeviceNucleus,
    DeviceDraw,
    Host,
}

/// What a sampling row's route depends on besides its settings.
#[derive(Debug, Clone, Copy)]
struct RowState {
    /// The backend's largest device top-k (0: it samples on the host).
    top_k_max: usize,
    /// Vocabulary size.
    vocab: usize,
    /// The row's pick is copied to samples still to fork, each of which
    /// draws with its own RNG (so the pick must be data, not a drawn token).
    forks: bool,
}

/// Where a row's token is picked: on the device when the backend samples
/// there, by the sampler's settings; top_k >= the vocabulary is no cut, as
/// on the host.
/// The whole-row draw happens on the device only for a row no sample forks
/// from (the forks' own uniforms are drawn on the host, from the row).
fn route(p: &GenerationParams, r: RowState) -> Route {
    let k = if p.top_k >= r.vocab { 0 } else { p.top_k };
    if r.top_k_max == 0 {
        Route::Host
    } else if p.temperature == 0.0 {
        Route::DeviceArgmax
    } else if k == 0 && p.top_p >= 1.0 {
        if r.forks {
            Route::Host
        } else {
            Route::DeviceDraw
        }
    } else if k == 0 {
        Route::DeviceNucleus
    } else if k <= r.top_k_max {
        Route::DeviceTopK
    } else {
        Route::Host
    }
}

/// Per chunk of the plan: the pick of a generation chunk that samples,
/// `None` for every other chunk.
pub fn pick(
    out: &StepLogits,
    plan: &StepPlan,
    sched: &Scheduler,
    stops: &StopRule<'_>,
) -> Result<Vec<Option<Picked>>> {
    // Constrained rows and rows with early stops are masked on the device;
    // their masked copies are appended to the logits and picked from there.
    let (logits, masked_row) = masked(out, plan, sched, stops)?;
    let routes = routes(out, plan, sched, logits.dim(1)?);
    // The sampled row is the last of a generation chunk's span, or its
    // masked copy; device routes read its penalized copy where there is one.
    // (A chunk with no rows is skipped; its entry is never read.)
    let raw: Vec<u32> = (0..routes.len())
        .map(|i| {
            masked_row[i].unwrap_or((out.spans[i].0 + out.spans[i].1).saturating_sub(1) as u32)
        })
        .collect();
    let (logits, penalized) = penalized(out, &logits, plan, sched, &routes, |i| raw[i])?;
    let at = Picker {
        out,
        plan,
        sched,
        logits: &logits,
        row: (0..routes.len())
            .map(|i| penalized[i].unwrap_or(raw[i]))
            .collect(),
    };
    let of =
        |want: Route| -> Vec<usize> { (0..routes.len()).filter(|&i| routes[i] == want).collect() };
    let mut picks: Vec<Option<Picked>> = vec![None; routes.len()];
    let mut host = of(Route::Host);
    at.argmax(&of(Route::DeviceArgmax), &mut picks)?;
    host.extend(at.top_k(&of(Route::DeviceTopK), &mut picks)?);
    host.extend(at.nucleus(&of(Route::DeviceNucleus), &mut picks)?);
    host.extend(at.draw(&of(Route::DeviceDraw), &mut picks)?);
    if !host.is_empty() {
        // Unpenalized rows: the host sampler applies the penalty itself.
        let rows = select(&logits, host.iter().map(|&i| raw[i]).collect())?;
        for (i, r) in host.into_iter().zip(rows.to_vec2::<f32>()?) {
            picks[i] = Some(Picked::Logits(r));
        }
    }
    Ok(picks)
}

/// Each chunk's route.
fn routes(out: &StepLogits, plan: &StepPlan, sched: &Scheduler, vocab: usize) -> Vec<Route> {
    let top_k_max = out.ops.device_top_k_max();
    plan.chunks
        .iter()
        .zip(&out.spans)
        .map(|(c, &(_, n))| {
            let req = sched.request(c.seq);
            if req.kind != RequestKind::Generate || n == 0 {
                return Route::Skip;
            }
            let state = RowState {
                top_k_max,
                vocab,
                forks: !req.fork_indices().is_empty(),
            };
            route(&req.params, state)
        })
        .collect()
}

/// The device routes' picks over one step's logits; each returns the chunks
/// that fall back to the host sampler.
struct Picker<'a> {
    out: &'a StepLogits,
    plan: &'a StepPlan,
    sched: &'a Scheduler,
    logits: &'a Tensor,
    /// Per chunk, the logits row its device route reads.
    row: Vec<u32>,
}

impl Picker<'_> {
    fn params(&self, i: usize) -> &GenerationParams {
        &self.sched.request(self.plan.chunks[i].seq).params
    }

    fn rows(&self, chunks: &[usize]) -> Result<Tensor> {
        select(self.logits, chunks.iter().map(|&i| self.row[i]).collect())
    }

    fn temps(&self, chunks: &[usize]) -> Vec<f32> {
        chunks
            .iter()
            .map(|&i| self.params(i).temperature as f32)
            .collect()
    }

    fn argmax(&self, chunks: &[usize], picks: &mut [Option<Picked>]) -> Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let ids = self
            .logits
            .argmax(candle_core::D::Minus1)?
            .to_vec1::<u32>()?;
        for &i in chunks {
            picks[i] = Some(Picked::Token(ids[self.row[i] as usize]));
        }
        Ok(())
    }

    fn top_k(&self, chunks: &[usize], picks: &mut [Option<Picked>]) -> Result<Vec<usize>> {
        let mut host = Vec::new();
        if chunks.is_empty() {
            return Ok(host);
        }
        let k = chunks
            .iter()
            .map(|&i| self.params(i).top_k)
            .max()
            .unwrap_or(1);
        // Only each row's top-k candidates cross PCIe; the host draws from
        // them exactly as from its own sorted, truncated list.
        let rows = self.rows(chunks)?;
        let cands = self
            .out
            .ops
            .top_k_candidates(&rows, &self.temps(chunks), k)?;
        for (&i, mut c) in chunks.iter().zip(cands) {
            let k = self.params(i).top_k;
            c.truncate(k);
            if c.len() < k {
                // Fewer finite logits than top_k: the host sampler does
                // not cut then (and with none, takes the argmax).
                host.push(i);
            } else {
                picks[i] = Some(Picked::Candidates(c));
            }
        }
        Ok(host)
    }

    fn nucleus(&self, chunks: &[usize], picks: &mut [Option<Picked>]) -> Result<Vec<usize>> {
        let mut host = Vec::new();
        if chunks.is_empty() {
            return Ok(host);
        }
        let (rows, t) = (self.rows(chunks)?, self.temps(chunks));
        let k = NUCLEUS_CANDIDATES.min(self.out.ops.device_top_k_max());
        let cands = self.out.ops.top_k_candidates(&rows, &t, k)?;
        let norms = self.out.ops.row_norms(&rows, &t)?;
        for ((&i, c), (_, sum)) in chunks.iter().zip(cands).zip(norms) {
            if sampler::nucleus_fits(&c, sum, self.params(i).top_p) {
                picks[i] = Some(Picked::Nucleus(c, sum));
            } else {
                host.push(i); // a nucleus wider than the candidates
            }
        }
        Ok(host)
    }

    fn draw(&self, chunks: &[usize], picks: &mut [Option<Picked>]) -> Result<Vec<usize>> {
        let mut host = Vec::new();
        if chunks.is_empty() {
            return Ok(host);
        }
        // The record's next uniform, read from a copy of its RNG; the host
        // consumes it when it takes the token.
        let us: Vec<f64> = chunks
            .iter()
            .map(|&i| {
                self.sched
                    .request(self.plan.chunks[i].seq)
                    .rng()
                    .clone()
                    .next_f64()
            })
            .collect();
        let drawn = self
            .out
            .ops
            .draw(&self.rows(chunks)?, &self.temps(chunks), &us)?;
        for (&i, tok) in chunks.iter().zip(drawn) {
            match tok {
                Some(t) => picks[i] = Some(Picked::Drawn(t)),
                None => host.push(i), // no finite logit
            }
        }
        Ok(host)
    }
}

/// The logits with, appended, a penalized copy of the sampled row of each
/// device-routed chunk whose repetition penalty is not 1 (HF's penalty
/// over the request's prompt and generated tokens, on the device), and
/// per chunk the row of its copy.
fn penalized(
    out: &StepLogits,
    logits: &Tensor,
    plan: &StepPlan,
    sched: &Scheduler,
    routes: &[Route],
    row: impl Fn(usize) -> u32,
) -> Result<(Tensor, Vec<Option<u32>>)> {
    let mut at = vec![None; routes.len()];
    let chunks: Vec<usize> = (0..routes.len())
        .filter(|&i| {
            !matches!(routes[i], Route::Skip | Route::Host)
                && sched.request(plan.chunks[i].seq).params.repetition_penalty != 1.0
        })
        .collect();
    if chunks.is_empty() {
        return Ok((logits.clone(), at));
    }
    let base = logits.dim(0)?;
    let seen: Vec<Vec<u32>> = chunks
        .iter()
        .map(|&i| sched.request(plan.chunks[i].seq).tokens().to_vec())
        .collect();
    let pens: Vec<f32> = chunks
        .iter()
        .map(|&i| sched.request(plan.chunks[i].seq).params.repetition_penalty as f32)
        .collect();
    let rows = select(logits, chunks.iter().map(|&i| row(i)).collect())?;
    let pen = out.ops.penalize(&rows, &seen, &pens)?;
    for (j, &i) in chunks.iter().enumerate() {
        at[i] = Some((base + j) as u32);
    }
    Ok((Tensor::cat(&[logits, &pen], 0)?, at))
}

/// The logits to pick from: `out.logits` with, appended, a masked copy of
/// the sampled row of each chunk that is constrained (allowed tokens keep
/// their logit exactly, the others get [`BLOCKED`] added: never picked,
/// probability 0) or whose stop tokens `min_new_tokens` still masks (those
/// at -inf, as the host sampler masks them), and per chunk the row of its
/// copy. The constraint masks travel as f16 biases (0 or `BLOCKED`), the
/// early stops as token ids; both are applied on the logits' device.
fn masked(
    out: &StepLogits,
    plan: &StepPlan,
    sched: &Scheduler,
    stops: &StopRule<'_>,
) -> Result<(Tensor, Vec<Option<u32>>)> {
    let mut at = vec![None; plan.chunks.len()];
    let (mut rows, mut masks, mut early) = (Vec::new(), Vec::new(), Vec::new());
    let (base, vocab) = out.logits.dims2()?;
    for (i, (c, &(first, n))) in plan.chunks.iter().zip(&out.spans).enumerate() {
        let req = sched.request(c.seq);
        if !c.samples || n == 0 || req.kind != RequestKind::Generate {
            continue;
        }
        let mask = req.guide.as_ref().and_then(|g| g.allowed.as_deref());
        // Ids past the vocabulary are no token (the host mask skips them).
        let mut stops = stops.early_stops(req);
        stops.retain(|&t| (t as usize) < vocab);
        if mask.is_some() || !stops.is_empty() {
            at[i] = Some((base + rows.len()) as u32);
            rows.push((first + n - 1) as u32);
            masks.push(mask);
            early.push(stops);
        }
    }
    if rows.is_empty() {
        return Ok((out.logits.clone(), at));
    }
    let sel = constrain(select(&out.logits, rows)?, &masks)?;
    let sel = block_tokens(&sel, &early)?;
    Ok((Tensor::cat(&[&out.logits, &sel], 0)?, at))
}

/// `rows` [n, vocab] with each present mask applied (a disallowed token
/// gets [`BLOCKED`] added); the rows without one unchanged.
fn constrain(rows: Tensor, masks: &[Option<&[u8]>]) -> Result<Tensor> {
    if masks.iter().all(Option::is_none) {
        return Ok(rows);
    }
    let (n, vocab) = rows.dims2()?;
    let mut bias = Vec::with_capacity(n * vocab);
    for m in masks {
        match m {
            Some(m) => bias.extend(
                m.iter()
                    .map(|&a| if a == 1 { half::f16::ZERO } else { BLOCKED }),
            ),
            None => bias.extend(std::iter::repeat_n(half::f16::ZERO, vocab)),
        }
    }
    let bias = Tensor::from_vec(bias, (n, vocab), rows.device())?.to_dtype(DType::F32)?;
    Ok((rows + bias)?)
}

/// `rows` [n, vocab] (f32) with the tokens `ids[r]` (each < vocab) of each
/// row r at -inf: -inf is added there (x + -inf = -inf for every x but NaN,
/// which no sampler route picks); the other values are untouched, bit for
/// bit (the padding index `u32::MAX` is one candle's scatter skips).
pub(super) fn block_tokens(rows: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
    let width = ids.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 {
        return Ok(rows.clone());
    }
    let n = ids.len();
    let (mut idx, mut add) = (Vec::with_capacity(n * width), Vec::with_capacity(n * width));
    for row in ids {
        let pad = width - row.len();
        idx.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(u32::MAX, pad)),
        );
        add.extend(
            std::iter::repeat_n(f32::NEG_INFINITY, row.len()).chain(std::iter::repeat_n(0.0, pad)),
        );
    }
    let dev = rows.device();
    let idx = Tensor::from_vec(idx, (n, width), dev)?;
    let add = Tensor::from_vec(add, (n, width), dev)?;
    Ok(rows.scatter_add(&idx, &add, 1)?)
}

/// What a blocked token's logit gets added: f16's lowest, far below any
/// logit (exp underflows to 0 against any allowed one).
const BLOCKED: half::f16 = half::f16::MIN;

/// Rows of a logits tensor, on its device.
pub(super) fn select(logits: &Tensor, rows: Vec<u32>) -> Result<Tensor> {
    let n = rows.len();
    let idx = Tensor::from_vec(rows, n, logits.device())?;
    Ok(logits.index_select(&idx, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_follow_the_settings_and_a_forked_draw_stays_on_the_host() {
        let p = |temperature: f64, top_k: usize, top_p: f64| GenerationParams {
            temperature,
            top_k,
            top_p,
            ..GenerationParams::default()
        };
        let r = RowState {
            top_k_max: 64,
            vocab: 32000,
            forks: false,
        };
        assert_eq!(route(&p(0.0, 0, 1.0), r), Route::DeviceArgmax);
        assert_eq!(route(&p(0.8, 40, 1.0), r), Route::DeviceTopK);
        assert_eq!(route(&p(0.8, 100, 1.0), r), Route::Host);
        assert_eq!(route(&p(0.8, 0, 0.9), r), Route::DeviceNucleus);
        assert_eq!(route(&p(0.8, 0, 1.0), r), Route::DeviceDraw);
        assert_eq!(route(&p(0.8, 32000, 1.0), r), Route::DeviceDraw);
        // Forks copy the pick and draw with their own RNGs: data, not a token.
        let forks = RowState { forks: true, ..r };
        assert_eq!(route(&p(0.8, 0, 1.0), forks), Route::Host);
        assert_eq!(route(&p(0.8, 0, 0.9), forks), Route::DeviceNucleus);
        assert_eq!(route(&p(0.8, 40, 1.0), forks), Route::DeviceTopK);
        // Early stops are masked in a copy of the row: the same route.
        let masked = GenerationParams {
            min_new_tokens: 5,
            ..p(0.8, 40, 1.0)
        };
        assert_eq!(route(&masked, r), Route::DeviceTopK);
        let cpu = RowState { top_k_max: 0, ..r };
        assert_eq!(route(&p(0.0, 0, 1.0), cpu), Route::Host);
    }

    #[test]
    fn blocked_tokens_are_minus_infinity_and_the_rest_is_untouched() {
        let dev = candle_core::Device::Cpu;
        // -0.0 at token 0, where a padding that added 0.0 would flip it.
        let vals: Vec<f32> = vec![
            -0.0,
            -1.25,
            f32::NEG_INFINITY,
            3.0,
            f32::NAN,
            0.5,
            1e30,
            7.5,
        ];
        let rows = Tensor::from_vec(vals.repeat(3), (3, 8), &dev).unwrap();
        // Row 0: two ids (one repeated), row 1: none, row 2: one id.
        let ids = vec![vec![1, 6, 1], vec![], vec![3]];
        let got = block_tokens(&rows, &ids).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in got.iter().enumerate() {
            for (t, (&g, &v)) in row.iter().zip(&vals).enumerate() {
                if ids[r].contains(&(t as u32)) {
                    assert_eq!(g, f32::NEG_INFINITY, "row {r} token {t}");
                } else {
                    assert!(
                        g.to_bits() == v.to_bits() || g.is_nan() && v.is_nan(),
                        "row {r} token {t}: {g} vs {v}"
                    );
                }
            }
        }
        // No ids at all: the same values, NaN included.
        let none = block_tokens(&rows, &[vec![], vec![], vec![]]).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(bits(&none), bits(&rows));
    }
}
