use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Admit(Vec<u32>),
    Grow(usize, usize),
    Fork(usize),
    Free(usize),
    Preempt,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        // Small alphabet and lengths so that prefixes repeat.
        proptest::collection::vec(0u32..3, 1..40).prop_map(Op::Admit),
        (0usize..8, 1usize..20).prop_map(|(i, n)| Op::Grow(i, n)),
        (0usize..8).prop_map(Op::Fork),
        (0usize..8).prop_map(Op::Free),
        Just(Op::Preempt),
    ]
}

/// Every invariant of the allocator given the live tables.
fn check(a: &BlockAllocator, live: &[(BlockTable, Vec<u32>)]) {
    let mut refs = vec![0u32; a.total()];
    for (t, _) in live {
        for b in t.blocks() {
            refs[b.0 as usize] += 1;
        }
        assert_eq!(t.blocks().len(), t.len().div_ceil(a.block_size()));
    }
    for (i, &r) in refs.iter().enumerate() {
        assert_eq!(a.refs(BlockId(i as u32)), r, "refcount of block {i}");
    }
    let used = refs.iter().filter(|&&r| r > 0).count();
    assert_eq!(a.used(), used, "used blocks");
    assert_eq!(a.available() + a.used(), a.total(), "free + used = total");
    let mut seen = std::collections::HashSet::new();
    for b in a.free.iter().chain(a.evictable.values()) {
        assert!(seen.insert(*b), "block {} listed twice", b.0);
        assert_eq!(
            refs[b.0 as usize], 0,
            "available block {} is referenced",
            b.0
        );
    }
}

proptest! {
    #[test]
    fn blocks_never_leak_or_double_free(ops in proptest::collection::vec(op(), 1..120), caching in any::<bool>()) {
        let mut a = BlockAllocator::new(24, 4, caching);
        let mut live: Vec<(BlockTable, Vec<u32>)> = vec![];
        for op in ops {
            match op {
                Op::Admit(prompt) => {
                    let (mut t, reused) = a.start(&prompt);
                    prop_assert!(reused < prompt.len());
                    prop_assert_eq!(reused % 4, 0);
                    if a.grow(&mut t, prompt.len() - reused).is_some() {
                        a.commit(&mut t, &prompt);
                        live.push((t, prompt));
                    } else {
                        a.free(t);
                    }
                }
                Op::Grow(i, n) if !live.is_empty() => {
                    let i = i % live.len();
                    let (t, toks) = &mut live[i];
                    if let Some(copies) = a.grow(t, n) {
                        for c in &copies {
                            prop_assert_ne!(c.from, c.to);
                        }
                        toks.extend((0..n as u32).map(|x| x % 3));
                        a.commit(t, toks);
                    }
                }
                Op::Fork(i) if !live.is_empty() => {
                    let i = i % live.len();
                    let f = a.fork(&live[i].0);
                    let toks = live[i].1.clone();
                    live.push((f, toks));
                }
                Op::Free(i) if !live.is_empty() => {
                    let (t, _) = live.swap_remove(i % live.len());
                    a.free(t);
                }
                Op::Preempt if !live.is_empty() => {
                    // The youngest sequence gives its blocks back.
                    let (t, _) = live.pop().unwrap();
                    a.free(t);
                }
                _ => {}
            }
            check(&a, &live);
        }
        for (t, _) in live.drain(..) {
            a.free(t);
        }
        check(&a, &live);
        prop_assert_eq!(a.available(), a.total());
    }
}

#[test]
fn allocator_reuses_prefixes() {
    let mut a = BlockAllocator::new(16, 4, true);
    let prompt: Vec<u32> = (0..10).collect();
    let (mut t1, reused) = a.start(&prompt);
    assert_eq!(reused, 0);
    a.grow(&mut t1, 10).unwrap();
    a.commit(&mut t1, &prompt);
    // Same first 8 tokens: two full blocks shared.
    let mut p2: Vec<u32> = (0..8).collect();
    p2.extend([99, 98, 97]);
    let (t2, reused) = a.start(&p2);
    assert_eq!(reused, 8);
    assert_eq!(&t2.blocks()[..2], &t1.blocks()[..2]);
    assert_eq!(a.refs(t1.blocks()[0]), 2);
    // Freed blocks stay cached and are found again.
    a.free(t1);
    a.free(t2);
    let (t3, reused) = a.start(&prompt);
    assert_eq!(reused, 8);
    assert_eq!(a.stats().hit_tokens, 16);
    a.free(t3);
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_token() {
    let mut a = BlockAllocator::new(8, 4, true);
    let prompt: Vec<u32> = (0..8).collect();
    let (mut t, _) = a.start(&prompt);
    a.grow(&mut t, 8).unwrap();
    a.commit(&mut t, &prompt);
    let (t2, reused) = a.start(&prompt);
    assert_eq!(
        reused, 4,
        "the last block is recomputed so the last token has logits"
    );
    a.free(t);
    a.free(t2);
}

#[test]
fn grow_fails_cleanly_and_shared_partial_blocks_are_copied() {
    let mut a = BlockAllocator::new(3, 4, false);
    let (mut t, _) = a.start(&[1, 2, 3, 4, 5, 6]);
    a.grow(&mut t, 6).unwrap();
    let mut f = a.fork(&t);
    let copies = a.grow(&mut f, 1).unwrap();
    assert_eq!(
        copies,
        vec![BlockCopy {
            from: t.blocks()[1],
            to: f.blocks()[1]
        }]
    );
    assert_eq!(a.available(), 0);
    let before = t.clone();
    assert!(a.grow(&mut t, 8).is_none());
    assert_eq!(t, before);
    a.free(t);
    a.free(f);
    assert_eq!(a.available(), 3);
}
