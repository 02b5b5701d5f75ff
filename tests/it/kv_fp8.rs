//! The FP8 KV cache (`engine.kv_cache_dtype = "fp8"`, E4M3 with a scale per
//! token and KV head) against the model's own cache on the fixtures: the
//! logits' distance at every position of every reference sequence, and
//! the greedy tokens of `runner submit` against the reference generations.
//! The bounds are the README's.

use crate::common::{fixtures, json};
use candle_core::{DType, Device};

/// Largest |logit difference| of FP8 KV against the f32 cache, over every
/// position of every reference sequence, as a share of that position's
/// logit range (max - min).
pub const MAX_REL_DIFF: f32 = 0.05;

/// FP8 KV against the model's own cache on `dev` with `dtype`
/// activations: (worst relative difference, positions, argmax agreements
/// where the own cache's top-2 margin is at least 0.1 of its range, such
/// positions).
pub fn compare_on(model: &str, dtype: DType, dev: &Device) -> (f32, usize, usize, usize) {
    let fx = fixtures();
    let load = |fp8: bool| {
        let mut o = runner::model::LoadOptions::new(dtype, dev);
        o.kv_fp8 = fp8;
        runner::model::load(&fx.join(model), &o).unwrap()
    };
    let (base, fp8) = (load(false), load(true));
    let seqs = json(&fx.join("references/sequences.json"));
    let (mut worst, mut n, mut agree, mut clear) = (0f32, 0, 0, 0);
    for (_, ids) in seqs["sequences"].as_object().unwrap() {
        let ids: Vec<u32> = crate::common::token_ids(ids);
        let rows =
            |t: candle_core::Tensor| t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let a = rows(base.logits_full(&ids).unwrap());
        let b = rows(fp8.logits_full(&ids).unwrap());
        for (ra, rb) in a.iter().zip(&b) {
            let hi = ra.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lo = ra.iter().copied().fold(f32::INFINITY, f32::min);
            let d = ra
                .iter()
                .zip(rb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            worst = worst.max(d / (hi - lo));
            n += 1;
            let mut sorted = ra.clone();
            sorted.sort_by(|x, y| y.total_cmp(x));
            if sorted[0] - sorted[1] >= 0.1 * (hi - lo) {
                clear += 1;
                agree += usize::from(runner::sampler::argmax(ra) == runner::sampler::argmax(rb));
            }
        }
    }
    (worst, n, agree, clear)
}

#[test]
fn fp8_kv_logits_stay_within_the_stated_bound_of_the_f32_cache() {
    for m in crate::common::models() {
        let (worst, n, agree, clear) = compare_on(m, DType::F32, &Device::Cpu);
        eprintln!("{m}: fp8 KV worst |dlogit| / range {worst:.4} over {n} positions; argmax {agree}/{clear} where the margin is clear");
        assert!(worst <= MAX_REL_DIFF, "{m}: {worst} > {MAX_REL_DIFF}");
        assert_eq!(
            agree, clear,
            "{m}: argmax changed where the margin was clear"
        );
    }
}

/// Greedy steps are compared up to the first whose reference top1-top2
/// logit margin is below this (a near-tie that FP8's rounding may flip).
pub const GREEDY_MARGIN: f64 = 0.5;

#[test]
fn fp8_kv_greedy_submit_gives_the_reference_tokens() {
    // Through the real binary, f32 activations, every fixture generation.
    let (mut compared, mut generated) = (0, 0);
    for m in crate::common::models() {
        let (c, g) = crate::submit_greedy::check_upto(
            m,
            false,
            &["engine.kv_cache_dtype=fp8"],
            GREEDY_MARGIN,
        );
        compared += c;
        generated += g;
    }
    eprintln!("fp8 KV greedy: {compared} of {generated} tokens compared, all equal");
    assert!(
        compared * 2 >= generated,
        "only {compared} of {generated} tokens had a clear margin"
    );
}
