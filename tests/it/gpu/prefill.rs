//! The engine's flash prefill choice (`engine.prefill_attention`) on a
//! model with Mistral's head dim (128) and 4 query heads per KV head: the
//! wgmma kernel (Hopper) and the mma.sync kernel give the same logits up to
//! f16 rounding, over prompts long enough for `auto` to take the wgmma
//! kernel. Before Hopper both settings run the mma.sync kernel, so the
//! logits must be bit for bit the same.

use super::{gpu, host};
use candle_core::DType;
use runner::config::PrefillAttention;
use runner::model::{LoadOptions, Mistral, MistralConfig};

/// Two layers of random weights at Mistral-7B's attention shape per KV
/// head (4 heads of 128 over one KV head), a small vocabulary and MLP.
fn config() -> MistralConfig {
    MistralConfig {
        vocab_size: 512,
        hidden_size: 512,
        intermediate_size: 1024,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 1,
        head_dim: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        sliding_window: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        eos_token_ids: vec![2],
    }
}

#[test]
fn wgmma_and_mma_prefill_give_the_same_logits_to_f16_rounding() {
    let dev = gpu();
    let logits = |which: PrefillAttention| {
        let mut opts = LoadOptions::new(DType::F16, &dev);
        opts.prefill_attention = which;
        let m = Mistral::dummy(&config(), None, &opts, 0x5eed).unwrap();
        // Two prompts of 700 and 1,100 tokens in one forward: their
        // tiles average far more than 512 keys.
        let a: Vec<u32> = (0..700u32).map(|i| (i * 7 + 3) % 512).collect();
        let b: Vec<u32> = (0..1100u32).map(|i| (i * 13 + 5) % 512).collect();
        host(&m.logits_full_batch(&[&a, &b]).unwrap())
    };
    let mma = logits(PrefillAttention::Mma);
    let wg = logits(PrefillAttention::Wgmma);
    assert_eq!(mma.len(), wg.len());
    assert!(
        mma.iter().all(|v| v.is_finite()),
        "mma.sync logits not finite"
    );
    let worst = mma
        .iter()
        .zip(&wg)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let scale = mma.iter().map(|v| v.abs()).fold(0f32, f32::max);
    if runner::cuda::wgmma_runs_on(&dev) {
        assert!(
            worst <= 2e-2 * scale.max(1.0),
            "wgmma vs mma.sync prefill logits differ by {worst} (largest logit {scale})"
        );
        assert!(
            worst > 0.0,
            "the wgmma prefill did not run: bit-identical logits"
        );
    } else {
        assert_eq!(
            worst, 0.0,
            "both settings run the mma.sync kernel before Hopper"
        );
    }
}
