//! The paged KV cache's bookkeeping (pure CPU: no candle, no tokio): fixed
//! size blocks, a free list, per-sequence block tables, reference counts and
//! a prefix cache of full blocks keyed by a hash chained over
//! (parent hash, block tokens). Full blocks are immutable and shared; a
//! sequence only ever writes into its own last, partial block (copy-on-write
//! when that block is shared after a fork). Cached blocks whose refcount
//! drops to zero stay reusable until evicted, least recently used first.

use std::collections::{BTreeMap, HashMap};

/// A block index in the device cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Prefix hash when the block is full and registered.
    hash: Option<u64>,
    /// LRU stamp while evictable (refs == 0 and hashed).
    stamp: u64,
}

/// A copy the device must perform before a write (copy-on-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    /// Source block.
    pub from: BlockId,
    /// Destination block.
    pub to: BlockId,
}

/// Counters of the allocator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Prompt tokens served from the prefix cache.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

/// The block allocator and prefix cache.
#[derive(Debug)]
pub struct BlockAllocator {
    block_size: usize,
    blocks: Vec<Block>,
    /// Blocks with refs == 0 and no hash.
    free: Vec<BlockId>,
    /// Blocks with refs == 0 and a hash, by LRU stamp.
    evictable: BTreeMap<u64, BlockId>,
    /// hash -> block, for every registered block (in use or evictable).
    cached: HashMap<u64, BlockId>,
    clock: u64,
    caching: bool,
    stats: KvStats,
}

/// A sequence's blocks and the number of token slots filled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    tokens: usize,
    /// Chained hash of the last registered full block.
    last_hash: Option<u64>,
    /// Full blocks already hashed (registered or checked).
    hashed_blocks: usize,
}

impl BlockTable {
    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Token slots filled.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Whether no slot is filled.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }
}

/// FNV-1a over bytes, continuing from `h` (start from [`FNV_OFFSET`]):
/// stable across platforms and versions.
pub fn fnv1a(mut h: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// FNV-1a's offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// Hash of a full block chained on its parent's (FNV-1a, stable).
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let h = fnv1a(FNV_OFFSET, parent.map_or(0x5eed, |p| p).to_le_bytes());
    tokens
        .iter()
        .fold(h, |h, &t| fnv1a(h, (t as u64).to_le_bytes()))
}

impl BlockAllocator {
    /// `num_blocks` blocks of `block_size` tokens; prefix caching on or off.
    pub fn new(num_blocks: usize, block_size: usize, caching: bool) -> Self {
        assert!(
            block_size > 0 && num_blocks > 0,
            "block_size and num_blocks must be positive"
        );
        Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            evictable: BTreeMap::new(),
            cached: HashMap::new(),
            clock: 0,
            caching,
            stats: KvStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free + evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// Counters.
    pub fn stats(&self) -> KvStats {
        self.stats
    }

    /// Reference count of a block (tests and invariants).
    pub fn refs(&self, b: BlockId) -> u32 {
        self.blocks[b.0 as usize].refs
    }

    fn take(&mut self) -> Option<BlockId> {
        if let Some(b) = self.free.pop() {
            self.blocks[b.0 as usize].refs = 1;
            return Some(b);
        }
        let (&stamp, &b) = self.evictable.iter().next()?;
        self.evictable.remove(&stamp);
        let blk = &mut self.blocks[b.0 as usize];
        if let Some(h) = blk.hash.take() {
            self.cached.remove(&h);
        }
        blk.refs = 1;
        self.stats.evictions += 1;
        Some(b)
    }

    fn release(&mut self, b: BlockId) {
        let blk = &mut self.blocks[b.0 as usize];
        assert!(blk.refs > 0, "double free of block {}", b.0);
        blk.refs -= 1;
        if blk.refs == 0 {
            if blk.hash.is_some() {
                self.clock += 1;
                blk.stamp = self.clock;
                self.evictable.insert(self.clock, b);
            } else {
                self.free.push(b);
            }
        }
    }

    fn retain(&mut self, b: BlockId) {
        let blk = &mut self.blocks[b.0 as usize];
        if blk.refs == 0 {
            self.evictable.remove(&blk.stamp);
        }
        blk.refs += 1;
    }

    /// Starts a table for a prompt, reusing cached full blocks of its
    /// prefix. At least one prompt token is always left to compute (its
    /// logits start generation). Returns the table and the tokens reused.
    pub fn start(&mut self, prompt: &[u32]) -> (BlockTable, usize) {
        let mut t = BlockTable::default();
        if !self.caching {
            return (t, 0);
        }
        let bs = self.block_size;
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        for i in 0..max_blocks {
            let h = block_hash(t.last_hash, &prompt[i * bs..(i + 1) * bs]);
            let Some(&b) = self.cached.get(&h) else { break };
            self.retain(b);
            t.blocks.push(b);
            t.tokens += bs;
            t.last_hash = Some(h);
            t.hashed_blocks += 1;
        }
        let reused = t.tokens;
        self.stats.hit_tokens += reused as u64;
        (t, reused)
    }

    /// Makes room for `n` more tokens in the table. Returns the copies to
    /// perform (copy-on-write of a shared partial last block), or `None`
    /// (and changes nothing) when blocks run out.
    pub fn grow(&mut self, t: &mut BlockTable, n: usize) -> Option<Vec<BlockCopy>> {
        let bs = self.block_size;
        let need_blocks = (t.tokens + n).div_ceil(bs);
        let mut copies = vec![];
        let partial_shared =
            !t.tokens.is_multiple_of(bs) && t.blocks.last().is_some_and(|&b| self.refs(b) > 1);
        let extra = need_blocks.saturating_sub(t.blocks.len()) + partial_shared as usize;
        if extra > self.available() {
            return None;
        }
        if partial_shared {
            let old = *t.blocks.last().expect("partial block exists");
            let new = self.take().expect("checked available");
            self.release(old);
            *t.blocks.last_mut().expect("partial block exists") = new;
            copies.push(BlockCopy { from: old, to: new });
        }
        while t.blocks.len() < need_blocks {
            let b = self.take().expect("checked available");
            t.blocks.push(b);
        }
        t.tokens += n;
        Some(copies)
    }

    /// Registers the table's newly full blocks in the prefix cache;
    /// `tokens` are the sequence's tokens so far (at least `t.len()`).
    pub fn commit(&mut self, t: &mut BlockTable, tokens: &[u32]) {
        if !self.caching {
            return;
        }
        let bs = self.block_size;
        let full = t.tokens.min(tokens.len()) / bs;
        while t.hashed_blocks < full {
            let i = t.hashed_blocks;
            let h = block_hash(t.last_hash, &tokens[i * bs..(i + 1) * bs]);
            let b = t.blocks[i];
            if !self.cached.contains_key(&h) && self.blocks[b.0 as usize].hash.is_none() {
                self.blocks[b.0 as usize].hash = Some(h);
                self.cached.insert(h, b);
            }
            t.last_hash = Some(h);
            t.hashed_blocks += 1;
        }
    }

    /// A second table sharing every block of `t` (copy-on-write).
    pub fn fork(&mut self, t: &BlockTable) -> BlockTable {
        for &b in &t.blocks {
            self.retain(b);
        }
        t.clone()
    }

    /// Returns a table's blocks.
    pub fn free(&mut self, t: BlockTable) {
        for &b in t.blocks.iter().rev() {
            self.release(b);
        }
    }
}

#[cfg(test)]
mod tests;
