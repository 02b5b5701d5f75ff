//! CPU-side cost of one engine step: scheduler + block allocator, with 10k
//! simulated sequences queued and up to 512 running (no model). Target:
//! far below a GPU step, < 1 ms per step at 512 sequences.

use criterion::{criterion_group, criterion_main, Criterion};
use runner::config::GenerationParams;
use runner::scheduler::{RecordRef, Request, Scheduler, SchedulerConfig, SeqId};

fn setup(prefix_caching: bool) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 512,
        max_batch_tokens: 8192,
        num_blocks: 40_000,
        block_size: 16,
        prefix_caching,
    });
    let params = GenerationParams {
        max_new_tokens: 128,
        ignore_eos: true,
        ..Default::default()
    };
    for i in 0..10_000u64 {
        // A shared 64-token prefix, then 64..320 tokens of the record's own.
        let own = 64 + (i as usize * 37) % 256;
        let prompt: Vec<u32> = (0..64)
            .chain((0..own as u32).map(|t| 100 + (t * 7 + i as u32) % 30_000))
            .collect();
        let record = RecordRef {
            id: i.to_string(),
            ..Default::default()
        };
        s.add(SeqId(i), Request::generate(record, prompt, params.clone()));
    }
    s
}

/// One step: schedule, commit, append a token to every sampled sequence,
/// finish those past 128 generated tokens.
fn step(s: &mut Scheduler, generated: &mut std::collections::HashMap<SeqId, usize>) {
    let plan = s.schedule();
    s.commit(&plan);
    for c in plan.chunks.iter().filter(|c| c.samples) {
        s.push_token(c.seq, 7);
        let g = generated.entry(c.seq).or_default();
        *g += 1;
        if *g >= 128 {
            s.finish(c.seq);
        }
    }
}

/// A scheduler in steady state: 512 running, mostly decoding, thousands queued.
fn steady(caching: bool) -> (Scheduler, std::collections::HashMap<SeqId, usize>) {
    let mut s = setup(caching);
    let mut generated = std::collections::HashMap::new();
    for _ in 0..200 {
        step(&mut s, &mut generated);
    }
    assert_eq!(s.running(), 512);
    (s, generated)
}

fn bench(c: &mut Criterion) {
    for caching in [true, false] {
        let mut state = steady(caching);
        c.bench_function(
            &format!("schedule_step_512_running_10k_queued_prefix_caching_{caching}"),
            |b| {
                b.iter_custom(|iters| {
                    let mut total = std::time::Duration::ZERO;
                    for _ in 0..iters {
                        if state.0.running() < 512 || state.0.waiting() < 1000 {
                            state = steady(caching); // rebuilt outside the timed region
                        }
                        let t = std::time::Instant::now();
                        step(&mut state.0, &mut state.1);
                        total += t.elapsed();
                    }
                    total
                })
            },
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
