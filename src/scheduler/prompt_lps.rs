//! Prompt log-probabilities kept beside the prefix cache, so that a
//! request asking for them (`output.prompt_logprobs`) can still reuse
//! cached prompt blocks: the positions of a reused block are not computed,
//! so the values they predicted must come from here.
//!
//! Block i of a prompt (positions i*bs .. (i+1)*bs) predicts the tokens at
//! positions i*bs + 1 ..= (i+1)*bs; those values depend on the tokens up to
//! (i+1)*bs, so they are kept under the block's chained prefix hash
//! extended by the token after the block.

use crate::kv::block_hash;
use std::collections::{HashMap, VecDeque};

/// The kept values, oldest dropped first past `cap` blocks.
#[derive(Debug, Default)]
pub(super) struct PromptLps {
    map: HashMap<u64, Vec<f32>>,
    order: VecDeque<u64>,
    cap: usize,
}

/// Where a request's keeping stands: blocks kept so far and the chained
/// hash of the last of them.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Kept {
    pub blocks: usize,
    pub chain: Option<u64>,
}

/// The blocks of a prompt of `len` tokens that can be reused: those that
/// end before its last token (which is always computed).
fn reusable_blocks(len: usize, bs: usize) -> usize {
    len.saturating_sub(1) / bs
}

/// Fills `lps[1..=n * bs]` from the kept values of a prompt's first `n`
/// blocks (block i: the tokens at i*bs + 1 ..= (i+1)*bs).
pub(super) fn fill(lps: &mut [Option<f32>], kept: &[&[f32]], bs: usize) {
    for (i, v) in kept.iter().enumerate() {
        for (j, &lp) in v.iter().enumerate() {
            lps[i * bs + 1 + j] = Some(lp);
        }
    }
}

impl PromptLps {
    /// Keeps at most `cap` blocks' values.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            ..Self::default()
        }
    }

    /// The key of block `i` of `tokens` whose chained hash is `chain`.
    fn key(chain: u64, tokens: &[u32], i: usize, bs: usize) -> u64 {
        block_hash(Some(chain), &tokens[(i + 1) * bs..(i + 1) * bs + 1])
    }

    /// The kept values of the leading blocks of the prompt `tokens[..len]`
    /// that have them, block by block.
    pub fn kept(&self, tokens: &[u32], len: usize, bs: usize) -> Vec<&[f32]> {
        let mut chain = None;
        let mut out = Vec::new();
        for i in 0..reusable_blocks(len, bs) {
            let h = block_hash(chain, &tokens[i * bs..(i + 1) * bs]);
            let Some(v) = self.map.get(&Self::key(h, tokens, i, bs)) else {
                break;
            };
            out.push(v.as_slice());
            chain = Some(h);
        }
        out
    }

    /// Keeps the values of every further block of the prompt `tokens[..len]`
    /// whose predicted tokens all have theirs in `lps`, from where `kept`
    /// stands; returns where it stands after.
    pub fn keep(
        &mut self,
        tokens: &[u32],
        len: usize,
        bs: usize,
        lps: &[Option<f32>],
        mut kept: Kept,
    ) -> Kept {
        while kept.blocks < reusable_blocks(len, bs) {
            let i = kept.blocks;
            let Some(v) = lps[i * bs + 1..=(i + 1) * bs]
                .iter()
                .copied()
                .collect::<Option<Vec<f32>>>()
            else {
                break;
            };
            let h = block_hash(kept.chain, &tokens[i * bs..(i + 1) * bs]);
            let key = Self::key(h, tokens, i, bs);
            if self.cap > 0 && self.map.insert(key, v).is_none() {
                self.order.push_back(key);
                while self.order.len() > self.cap {
                    if let Some(old) = self.order.pop_front() {
                        self.map.remove(&old);
                    }
                }
            }
            kept = Kept {
                blocks: i + 1,
                chain: Some(h),
            };
        }
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_gets_back_the_values_of_the_blocks_another_kept() {
        let bs = 4;
        let a: Vec<u32> = (0..14).collect();
        let lps: Vec<Option<f32>> = (0..14).map(|i| (i > 0).then_some(-(i as f32))).collect();
        let mut kept = PromptLps::new(100);
        // Only the first 6 values known: block 0 (tokens 1..=4) only.
        let mut part = lps.clone();
        part[6..].iter_mut().for_each(|v| *v = None);
        let k = kept.keep(&a, a.len(), bs, &part, Kept::default());
        assert_eq!(k.blocks, 1);
        let k = kept.keep(&a, a.len(), bs, &lps, k);
        assert_eq!(k.blocks, 3, "blocks ending before the last token");
        // Same first 9 tokens, then another: blocks 0 and 1 (whose values
        // reach token 8) are known, block 2 is not.
        let mut b = a.clone();
        b[9] = 99;
        assert_eq!(kept.kept(&b, b.len(), bs).len(), 2);
        let mut got = vec![None; b.len()];
        fill(&mut got, &kept.kept(&b, b.len(), bs)[..2], bs);
        assert_eq!(&got[..=8], &lps[..=8]);
        assert!(got[9..].iter().all(Option::is_none));
        // The token right after a block is part of its key.
        let mut c = a.clone();
        c[8] = 77;
        assert_eq!(kept.kept(&c, c.len(), bs).len(), 1);
    }

    #[test]
    fn the_oldest_blocks_go_first_past_the_cap() {
        let bs = 2;
        let a: Vec<u32> = (0..9).collect();
        let lps: Vec<Option<f32>> = (0..9).map(|i| (i > 0).then_some(i as f32)).collect();
        let mut kept = PromptLps::new(2);
        let k = kept.keep(&a, a.len(), bs, &lps, Kept::default());
        assert_eq!(k.blocks, 4);
        assert_eq!(kept.map.len(), 2);
        assert_eq!(kept.kept(&a, a.len(), bs).len(), 0, "block 0 was dropped");
    }
}
