//! Sampling: repetition penalty, temperature, top-k, top-p, greedy argmax,
//! with a per-record RNG seeded from (seed, record id) so that a record's
//! output never depends on its neighbours in a batch.

use crate::config::GenerationParams;

/// A small, stable RNG (SplitMix64): the same seed gives the same stream on
/// every platform and version.
#[derive(Debug, Clone)]
pub struct RecordRng {
    state: u64,
}

impl RecordRng {
    /// Seeds from the job (or record) seed and the record id.
    pub fn new(seed: u64, record_id: &str) -> Self {
        // FNV-1a over the id, mixed with the seed.
        let h = crate::kv::fnv1a(crate::kv::FNV_OFFSET, record_id.bytes());
        let mut rng = Self {
            state: seed ^ h.rotate_left(17),
        };
        rng.next_u64();
        rng
    }

    /// The RNG of sample `index` of a record: sample 0's is [`Self::new`]'s,
    /// every other index mixes into the seed, so a sample's stream depends
    /// only on (seed, record id, index).
    pub fn for_sample(seed: u64, record_id: &str, index: u32) -> Self {
        if index == 0 {
            return Self::new(seed, record_id);
        }
        let mut mix = Self {
            state: (index as u64) ^ 0x5a4d_504c_455f_4944,
        };
        Self::new(seed ^ mix.next_u64(), record_id)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform float in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Applies HF's repetition penalty in place to every token in `seen`.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let p = penalty as f32;
    let mut done = std::collections::HashSet::with_capacity(seen.len());
    for &t in seen {
        if (t as usize) < logits.len() && done.insert(t) {
            let l = &mut logits[t as usize];
            *l = if *l < 0.0 { *l * p } else { *l / p };
        }
    }
}

/// Picks the next token, as [`prepare`] then [`draw`]. `seen` holds prompt
/// and generated ids (for the repetition penalty).
pub fn sample(
    logits: &mut [f32],
    seen: &[u32],
    params: &GenerationParams,
    rng: &mut RecordRng,
) -> u32 {
    let p = prepare(logits, seen, params);
    draw(&p, params, rng)
}

/// What the host sampler draws from, prepared without the record's RNG
/// (so many rows can be prepared at once, and drawn in order after).
#[derive(Debug, Clone, PartialEq)]
pub enum Prepared {
    /// Temperature 0, or no finite logit: the argmax; no uniform is used.
    Token(u32),
    /// Neither top-k nor top-p: every `(token, logit / t)` in id order.
    Unordered(Vec<(u32, f32)>),
    /// Candidates sorted by value (ties by lower id) that hold the draw —
    /// top-k's k best, or best ones holding the top-p nucleus — and the
    /// softmax normaliser over the candidates the probabilities are taken
    /// from (top-k: the k, summed in sorted order; top-p: the whole row,
    /// summed in id order as [`row_norm`]).
    Sorted(Vec<(u32, f32)>, f64),
}

/// The candidates' order: value descending, ties by lower id (total).
fn order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The repetition penalty, the temperature, top-k's cut and top-p's
/// candidates of one row: everything of [`sample`] but the uniform.
pub fn prepare(logits: &mut [f32], seen: &[u32], params: &GenerationParams) -> Prepared {
    apply_repetition_penalty(logits, seen, params.repetition_penalty);
    if params.temperature == 0.0 {
        return Prepared::Token(argmax(logits));
    }
    let t = params.temperature as f32;
    let mut cand = candidates(logits, t);
    if cand.is_empty() {
        return Prepared::Token(argmax(logits));
    }
    let cut = params.top_k > 0 && params.top_k < cand.len();
    if !cut && params.top_p >= 1.0 {
        // Neither top-k nor top-p: no order is needed, no sort.
        return Prepared::Unordered(cand);
    }
    if cut {
        // The k best (the order is total, so the set is too), then only
        // those sorted: the same prefix as a full sort.
        cand.select_nth_unstable_by(params.top_k - 1, order);
        cand.truncate(params.top_k);
        cand.sort_by(order);
        let (_, sum) = norm(&cand);
        return Prepared::Sorted(cand, sum);
    }
    // Top-p over the whole row: the normaliser over every candidate (in
    // id order, as row_norm), then the best 64, 256, ... sorted until they
    // hold the nucleus (each a prefix of the full sort), so a narrow
    // nucleus costs O(vocab), not a sort of the vocabulary.
    let (_, sum) = norm(&cand);
    let mut k = 64;
    while k < cand.len() {
        cand.select_nth_unstable_by(k - 1, order);
        cand[..k].sort_by(order);
        if nucleus_fits(&cand[..k], sum, params.top_p) {
            cand.truncate(k);
            return Prepared::Sorted(cand, sum);
        }
        k *= 4;
    }
    cand.sort_by(order);
    Prepared::Sorted(cand, sum)
}

/// [`sample`]'s draw from a prepared row with one uniform from the
/// record's RNG (none for [`Prepared::Token`]).
pub fn draw(p: &Prepared, params: &GenerationParams, rng: &mut RecordRng) -> u32 {
    match p {
        Prepared::Token(t) => *t,
        Prepared::Unordered(cand) => draw_unordered(cand, rng.next_f64()),
        Prepared::Sorted(cand, sum) => draw_sorted(cand, *sum, params.top_p, rng),
    }
}

/// A row's normaliser at temperature `t`, as [`sample`] computes it: (the
/// largest finite logit / t, the f64 sum of exp(f64(logit / t - max)) over
/// the finite logits); the twin of the device's `row_norms`.
pub fn row_norm(logits: &[f32], t: f32) -> (f32, f64) {
    norm(&candidates(logits, t))
}

/// The softmax normaliser of candidates `(token, logit / t)`: (their
/// largest value, the f64 sum of exp(f64(v - max)) added in their order).
fn norm(cand: &[(u32, f32)]) -> (f32, f64) {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    (
        max,
        cand.iter().map(|(_, v)| ((v - max) as f64).exp()).sum(),
    )
}

/// Every finite logit as `(token, logit / t)`, in id order: what the
/// sampler draws from.
fn candidates(logits: &[f32], t: f32) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite())
        .map(|(i, &v)| (i as u32, v / t))
        .collect()
}

/// [`sample`]'s draw with neither top-k nor top-p, given its uniform `u`
/// (the twin of the device's `draw_rows`); `None`: no finite logit.
pub fn draw_row(logits: &[f32], t: f32, u: f64) -> Option<u32> {
    let cand = candidates(logits, t);
    (!cand.is_empty()).then(|| draw_unordered(&cand, u))
}

/// The draw from every candidate `(token, logit / temperature)` in the
/// order given (token id order) with the uniform `u`: softmax, then the
/// inverse CDF, in O(vocab).
fn draw_unordered(cand: &[(u32, f32)], u: f64) -> u32 {
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = cand.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let target = u * weights.iter().sum::<f64>();
    let mut acc = 0.0;
    for (c, w) in cand.iter().zip(&weights) {
        acc += w;
        if target < acc {
            return c.0;
        }
    }
    cand[cand.len() - 1].0
}

/// The draw from candidates `(token, logit / temperature)` already sorted
/// (value descending, ties by lower id) and cut to top-k: softmax, top-p,
/// one uniform from the record's RNG. The GPU top-k path calls this on the
/// candidates it selected, so both paths draw identically.
pub fn sample_sorted(cand: &[(u32, f32)], params: &GenerationParams, rng: &mut RecordRng) -> u32 {
    draw_sorted(cand, norm(cand).1, params.top_p, rng)
}

/// Whether a row's best candidates (sorted as [`sample_sorted`]'s, the
/// first the row's largest logit / t) hold [`sample`]'s top-p nucleus under
/// the row's normaliser `sum` (from [`row_norm`] or the device's twin).
pub fn nucleus_fits(cand: &[(u32, f32)], sum: f64, top_p: f64) -> bool {
    let Some(&(_, max)) = cand.first() else {
        return false;
    };
    let mut acc = 0.0;
    cand.iter().any(|(_, v)| {
        acc += ((v - max) as f64).exp() / sum;
        acc >= top_p
    })
}

/// [`sample`]'s draw with top-k off and top-p < 1, from the row's best
/// candidates and its normaliser `sum`, when [`nucleus_fits`]: the same
/// probabilities, cut and uniform as the host's sort of the whole row.
pub fn sample_nucleus(
    cand: &[(u32, f32)],
    sum: f64,
    params: &GenerationParams,
    rng: &mut RecordRng,
) -> u32 {
    draw_sorted(cand, sum, params.top_p, rng)
}

/// Softmax of sorted candidates under `sum`, the top-p cut, one uniform.
fn draw_sorted(cand: &[(u32, f32)], sum: f64, top_p: f64, rng: &mut RecordRng) -> u32 {
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    probs.iter_mut().for_each(|p| *p /= sum);
    if top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let s: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= s);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64, top_k: usize, top_p: f64) -> GenerationParams {
        GenerationParams {
            max_new_tokens: 1,
            temperature,
            top_p,
            top_k,
            repetition_penalty: 1.0,
            seed: 0,
            stop: vec![],
            system_prompt: String::new(),
            ignore_eos: false,
            ..GenerationParams::default()
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut l = vec![0.5, 2.0, 2.0, -1.0];
        assert_eq!(
            sample(
                &mut l,
                &[],
                &params(0.0, 0, 1.0),
                &mut RecordRng::new(0, "a")
            ),
            1
        );
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut rng = RecordRng::new(3, "r");
        for _ in 0..50 {
            let mut l = vec![1.0, 3.0, 2.0];
            assert_eq!(sample(&mut l, &[], &params(1.0, 1, 1.0), &mut rng), 1);
            // p(1) = 0.665 >= 0.6: only token 1 survives top_p.
            let mut l = vec![1.0, 3.0, 2.0];
            assert_eq!(sample(&mut l, &[], &params(1.0, 0, 0.6), &mut rng), 1);
        }
    }

    #[test]
    fn rng_depends_on_seed_and_id_only() {
        let a: Vec<u64> = (0..4)
            .scan(RecordRng::new(7, "x"), |r, _| Some(r.next_u64()))
            .collect();
        let b: Vec<u64> = (0..4)
            .scan(RecordRng::new(7, "x"), |r, _| Some(r.next_u64()))
            .collect();
        let c: Vec<u64> = (0..4)
            .scan(RecordRng::new(7, "y"), |r, _| Some(r.next_u64()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Sampling at temperature 1 visits more than one token over many draws.
        let mut rng = RecordRng::new(1, "z");
        let picks: std::collections::HashSet<u32> = (0..200)
            .map(|_| sample(&mut [0.0, 0.1, 0.2], &[], &params(1.0, 0, 1.0), &mut rng))
            .collect();
        assert_eq!(picks.len(), 3);
    }

    #[test]
    fn without_top_k_and_top_p_the_draw_walks_the_ids_in_order_without_sorting() {
        let p = params(1.0, 0, 1.0);
        for seed in 0..20u64 {
            let mut logits = vec![0.0f32, 1.0, 2.0, 3.0];
            let u = RecordRng::new(seed, "r").next_f64();
            // The inverse CDF in id order (a sorted draw would walk 3, 2, 1, 0).
            let w: Vec<f64> = logits.iter().map(|&l| ((l - 3.0) as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let mut acc = 0.0;
            let want = w.iter().position(|x| {
                acc += x;
                u * total < acc
            });
            let got = sample(&mut logits, &[], &p, &mut RecordRng::new(seed, "r"));
            assert_eq!(Some(got as usize), want, "seed {seed}");
        }
    }

    #[test]
    fn drawing_from_the_top_k_prefix_equals_the_full_sampler() {
        let mut g = RecordRng::new(3, "logits");
        for case in 0..200u64 {
            let logits: Vec<f32> = (0..500)
                .map(|i| {
                    if i % 97 == 0 {
                        f32::NEG_INFINITY
                    } else {
                        (g.next_f64() * 8.0 - 4.0) as f32
                    }
                })
                .collect();
            let p = GenerationParams {
                temperature: 0.7,
                top_k: 1 + (case as usize % 64),
                top_p: if case % 2 == 0 { 1.0 } else { 0.9 },
                ..params(0.7, 0, 1.0)
            };
            let mut r1 = RecordRng::new(case, "x");
            let mut r2 = r1.clone();
            let want = sample(&mut logits.clone(), &[], &p, &mut r1);
            // What the GPU returns: the top-k of (id, v / t), value desc, ties by id.
            let mut cand: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, &v)| (i as u32, v / 0.7f32))
                .collect();
            cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(p.top_k);
            assert_eq!(sample_sorted(&cand, &p, &mut r2), want, "case {case}");
        }
    }

    /// A vocabulary-sized row of peaked logits (a few likely tokens, a long
    /// tail, some non-finite values), as an LLM's rows look.
    fn row(seed: u64, n: usize) -> Vec<f32> {
        let mut r = RecordRng::new(seed, "row");
        (0..n)
            .map(|i| match i % 997 {
                13 => f32::NEG_INFINITY,
                _ => {
                    let x = r.next_f64() as f32;
                    if x > 0.999 {
                        8.0 + 4.0 * x
                    } else {
                        4.0 * x - 2.0
                    }
                }
            })
            .collect()
    }

    #[test]
    fn top_p_from_the_best_candidates_draws_as_a_sort_of_the_whole_row() {
        // Rows whose nucleus is a few tokens, a few hundred, and nearly the
        // whole row (flat logits): prepare() stops at 64, 256, 1024, ...
        // best candidates or sorts everything; the draw must be the one a
        // plain sort of the row gives, for every uniform.
        let mut widths = Vec::new();
        for seed in 0..40u64 {
            let spread = [200.0f32, 60.0, 0.05][seed as usize % 3];
            let mut r = RecordRng::new(seed, "flat");
            let logits: Vec<f32> = (0..5000)
                .map(|i| {
                    if i % 611 == 7 {
                        f32::NEG_INFINITY
                    } else {
                        spread * r.next_f64() as f32
                    }
                })
                .collect();
            let p = params(0.9, 0, 0.9);
            let t = 0.9f32;
            // The plain way: sort the whole row, normaliser in id order.
            let mut all = candidates(&logits, t);
            let (_, sum) = row_norm(&logits, t);
            all.sort_by(order);
            let prepared = prepare(&mut logits.clone(), &[], &p);
            let Prepared::Sorted(cand, got_sum) = &prepared else {
                panic!("top-p prepares sorted candidates, got {prepared:?}");
            };
            assert_eq!(*got_sum, sum);
            assert_eq!(&all[..cand.len()], &cand[..], "seed {seed}");
            widths.push(cand.len());
            for k in 0..20 {
                let id = format!("s{seed}-{k}");
                let mut a = RecordRng::new(seed, &id);
                let mut b = a.clone();
                assert_eq!(
                    draw(&prepared, &p, &mut a),
                    draw_sorted(&all, sum, p.top_p, &mut b),
                    "seed {seed} draw {k}"
                );
            }
        }
        // Every stopping point was taken: 64, a wider prefix, the whole row.
        assert!(widths.contains(&64), "{widths:?}");
        assert!(widths.iter().any(|&w| w > 64 && w < 4000), "{widths:?}");
        assert!(widths.iter().any(|&w| w > 4000), "{widths:?}");
    }

    /// The device route's candidates: the row's best `k` (token, v / t) in
    /// the host's order.
    fn best(logits: &[f32], t: f32, k: usize) -> Vec<(u32, f32)> {
        let mut c = candidates(logits, t);
        c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        c.truncate(k);
        c
    }

    #[test]
    fn the_nucleus_from_candidates_and_the_row_normaliser_draws_as_the_full_sort() {
        let mut fitted = 0;
        for seed in 0..300u64 {
            let logits = row(seed, 32000);
            for (t, top_p) in [(0.7f64, 0.9f64), (1.0, 0.5), (1.3, 0.95)] {
                let p = params(t, 0, top_p);
                let cand = best(&logits, t as f32, 64);
                let (max, sum) = row_norm(&logits, t as f32);
                assert_eq!(max, cand[0].1);
                if !nucleus_fits(&cand, sum, top_p) {
                    continue;
                }
                fitted += 1;
                let id = format!("r{seed}");
                let want = sample(&mut logits.clone(), &[], &p, &mut RecordRng::new(seed, &id));
                let mut rng = RecordRng::new(seed, &id);
                assert_eq!(
                    sample_nucleus(&cand, sum, &p, &mut rng),
                    want,
                    "seed {seed} t {t}"
                );
            }
        }
        assert!(
            fitted > 300,
            "only {fitted} rows had their nucleus in 64 candidates"
        );
        // A flat row's nucleus is wider than the candidates: not fitted.
        let flat = vec![0.0f32; 1000];
        let (_, sum) = row_norm(&flat, 1.0);
        assert!(!nucleus_fits(&best(&flat, 1.0, 64), sum, 0.9));
    }

    #[test]
    fn the_draw_given_its_uniform_is_the_host_samplers_draw() {
        for seed in 0..300u64 {
            let logits = row(seed, 32000);
            let t = 0.8f32;
            let id = format!("d{seed}");
            let p = params(t as f64, 0, 1.0);
            let want = sample(&mut logits.clone(), &[], &p, &mut RecordRng::new(seed, &id));
            let u = RecordRng::new(seed, &id).next_f64();
            assert_eq!(draw_row(&logits, t, u), Some(want), "seed {seed}");
        }
        assert_eq!(draw_row(&[f32::NAN, f32::NEG_INFINITY], 1.0, 0.5), None);
    }
}
