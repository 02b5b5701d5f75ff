//! Shared-prefix (cascade) decode: which partitions of a decode step's
//! sequences cover the same cache blocks, so that the decode kernel reads
//! each such partition once for several sequences instead of once each.
//!
//! The CUDA decode kernel splits a sequence's keys into partitions of a
//! fixed size (`part`). Sequences that reached the same prompt prefix
//! through the prefix cache hold the same physical blocks there, so their
//! full partitions over it hold the same keys. This module groups them on
//! the host; the kernel (kernels/attention_decode.cuh, `items`) computes each
//! sequence's partials exactly as its own block would, so the result is
//! bit-identical with or without the plan.

use crate::kv::BlockId;
use std::collections::HashMap;

/// Rows per item of the engine's plans: four tensor-core tiles of 16 rows
/// (the kernel's row groups), `64 / group` sequences of `group` query heads
/// each. [`TILE_ROWS`] (one tile) is the previous engine's, kept for the
/// benches and the bit-identity test.
pub const ITEM_ROWS: usize = 64;

/// Rows of one tensor-core tile: the smallest item.
pub const TILE_ROWS: usize = 16;

/// How a plan cuts its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanShape {
    /// Cache block size (keys).
    pub block_size: usize,
    /// Keys per partition (the decode kernel's PART).
    pub part: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// Rows per item (a multiple of [`TILE_ROWS`]): `rows / group`
    /// sequences share one read of a partition.
    pub rows: usize,
}

impl PlanShape {
    /// The engine's: [`ITEM_ROWS`] rows per item.
    pub fn new(block_size: usize, part: usize, group: usize) -> Self {
        Self {
            block_size,
            part,
            group,
            rows: ITEM_ROWS,
        }
    }

    /// Integers per item (the kernel's `2 + 16 * RG`): the partition, the
    /// sequence count, then up to `rows` sequence indices (unused: 0).
    pub fn item_ints(&self) -> usize {
        2 + self.rows
    }
}

/// A step's shared partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedParts {
    /// Items, `2 + rows` integers each: `[p, n, s_0, .., s_{n-1}, 0..]`.
    pub items: Vec<u32>,
    /// Per sequence, how many of its leading partitions the items cover
    /// (0: none); the per-sequence kernel skips them.
    pub skip: Vec<u32>,
    /// The longest context among the sequences with items: the plan holds
    /// only where a sliding window does not cut any of them.
    pub max_ctx: usize,
    /// Query heads per KV head it was made for.
    pub group: usize,
    /// Rows per item.
    pub rows: usize,
}

impl SharedParts {
    /// Items in the plan.
    pub fn count(&self) -> usize {
        self.items.len() / (2 + self.rows)
    }
}

/// Groups, for p = 0, 1, .., the sequences whose partition p is full
/// (`ctx >= (p + 1) * part`) and covers the same blocks as another's,
/// among those whose partitions before p were shared too (so a sequence's
/// shared partitions are its first `skip` ones). `tables[i]` and `ctx[i]`
/// are sequence i's block table and context length (keys, including the
/// query's own). `None` when nothing is shared, or `part` is not whole
/// blocks, or an item cannot hold two sequences.
pub fn plan(tables: &[&[BlockId]], ctx: &[u32], shape: PlanShape) -> Option<SharedParts> {
    let PlanShape {
        block_size,
        part,
        group,
        rows,
    } = shape;
    if block_size == 0
        || !part.is_multiple_of(block_size)
        || group == 0
        || group * 2 > rows
        || !rows.is_multiple_of(TILE_ROWS)
    {
        return None;
    }
    let per_item = rows / group;
    let pb = part / block_size;
    let mut items = Vec::new();
    let mut skip = vec![0u32; ctx.len()];
    let mut max_ctx = 0;
    let mut live: Vec<usize> = (0..ctx.len()).collect();
    let mut p = 0;
    while !live.is_empty() {
        // First-seen order keeps the plan deterministic.
        let mut index: HashMap<&[BlockId], usize> = HashMap::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &i in &live {
            let full = ctx[i] as usize >= (p + 1) * part;
            let Some(key) = tables[i].get(p * pb..(p + 1) * pb).filter(|_| full) else {
                continue;
            };
            let g = *index.entry(key).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        live.clear();
        for members in groups.into_iter().filter(|m| m.len() > 1) {
            for chunk in members.chunks(per_item) {
                items.extend([p as u32, chunk.len() as u32]);
                items.extend(chunk.iter().map(|&i| i as u32));
                items.extend(std::iter::repeat_n(0, rows - chunk.len()));
            }
            for &i in &members {
                skip[i] = p as u32 + 1;
                max_ctx = max_ctx.max(ctx[i] as usize);
            }
            live.extend(members);
        }
        p += 1;
    }
    (!items.is_empty()).then_some(SharedParts {
        items,
        skip,
        max_ctx,
        group,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(r: std::ops::Range<u32>) -> Vec<BlockId> {
        r.map(BlockId).collect()
    }

    /// Parts of 4 blocks of 16 (64 keys), `rows` rows per item.
    fn shape(group: usize, rows: usize) -> PlanShape {
        PlanShape {
            block_size: 16,
            part: 64,
            group,
            rows,
        }
    }

    #[test]
    fn sequences_over_the_same_blocks_share_their_full_partitions_only() {
        // Sequences 0, 1 and 3 share blocks 0..8 (two partitions); 1
        // diverges from 0 and 3 after them; 2 is alone; 3's second
        // partition is not full.
        let shared = ids(0..8);
        let t0: Vec<BlockId> = [shared.clone(), ids(100..104)].concat();
        let t1: Vec<BlockId> = [shared.clone(), ids(200..204)].concat();
        let t2 = ids(300..312);
        let t3: Vec<BlockId> = shared.clone();
        let tables: Vec<&[BlockId]> = vec![&t0, &t1, &t2, &t3];
        let ctx = [190u32, 180, 190, 100];
        for rows in [TILE_ROWS, ITEM_ROWS] {
            let s = plan(&tables, &ctx, shape(4, rows)).expect("a plan");
            let ints = shape(4, rows).item_ints();
            // p 0: {0, 1, 3}; p 1: {0, 1} (3 has 100 < 128 keys); p 2: 0
            // and 1 diverge.
            assert_eq!(s.count(), 2);
            assert_eq!(s.items.len(), 2 * ints);
            assert_eq!(&s.items[..5], &[0, 3, 0, 1, 3]);
            assert_eq!(&s.items[ints..ints + 4], &[1, 2, 0, 1]);
            assert!(s.items[ints + 4..].iter().all(|&x| x == 0));
            assert_eq!(s.skip, vec![2, 2, 0, 1]);
            assert_eq!(s.max_ctx, 190);
        }
    }

    #[test]
    fn a_group_larger_than_an_item_is_split_and_nothing_shared_is_no_plan() {
        let t = ids(0..4);
        let tables: Vec<&[BlockId]> = vec![&t; 37];
        let ctx = [64u32; 37];
        let counts = |group, rows| -> Vec<u32> {
            let s = plan(&tables[..9], &ctx[..9], shape(group, rows)).expect("a plan");
            assert_eq!(s.skip, vec![1; 9]);
            s.items
                .chunks(shape(group, rows).item_ints())
                .map(|c| c[1])
                .collect()
        };
        // One tile: 4 sequences per item at 4 heads each: 4 + 4 + 1; 8
        // heads: 2 per item; 16: none fit two.
        assert_eq!(counts(4, TILE_ROWS), vec![4, 4, 1]);
        assert_eq!(counts(8, TILE_ROWS), vec![2, 2, 2, 2, 1]);
        assert_eq!(plan(&tables, &ctx, shape(16, TILE_ROWS)), None);
        // Four tiles: 16 sequences per item at 4 heads, 4 at 16 heads.
        assert_eq!(counts(4, ITEM_ROWS), vec![9]);
        assert_eq!(counts(16, ITEM_ROWS), vec![4, 4, 1]);
        let s = plan(&tables, &ctx, shape(4, ITEM_ROWS)).unwrap();
        let n: Vec<u32> = s
            .items
            .chunks(shape(4, ITEM_ROWS).item_ints())
            .map(|c| c[1])
            .collect();
        assert_eq!(n, vec![16, 16, 5]);
        // Different blocks, a partial partition, parts not whole blocks,
        // or rows not whole tiles.
        let (a, b) = (ids(0..4), ids(4..8));
        let s4 = shape(4, ITEM_ROWS);
        assert_eq!(plan(&[&a, &b], &[64, 64], s4), None);
        assert_eq!(plan(&[&a, &a], &[63, 64], s4), None);
        let odd_blocks = PlanShape {
            block_size: 24,
            ..s4
        };
        assert_eq!(plan(&[&a, &a], &[64, 64], odd_blocks), None);
        assert_eq!(plan(&[&a, &a], &[64, 64], shape(4, 24)), None);
    }
}
