#!/usr/bin/env bash
# One GPU-machine session: unpacks dev/bundle.tar.xz (built by
# benches/bundle.sh: stripped `runner` + `it` test binaries built with
# --features cuda, and fixture folders), then runs the steps named in $STEPS
# (comma-separated): tests, tests-wg (the wgmma tests, one process each), kernels (kernels:<branch>, e.g. kernels:8bit-32g), W1..W4 (at $SCALE of their prompts;
# W1@512 = max_num_seqs 512, default 256), peer / peer512 (HF transformers
# at batch 256 / 512). Logs and JSON land in $OUT.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
B=/tmp/rb
mkdir -p "$B" && tar xJf dev/bundle.tar.xz -C "$B" || exit 1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
export BENCH_COMMIT=$(cat dev/COMMIT 2>/dev/null)  # recorded in the bench JSON
echo "commit $BENCH_COMMIT"
export TEST_FIXTURES_DIR=$B/fixtures TEST_RUNNER_BIN=$B/runner
# The tests check the fixture models the bundle carries (unless named).
: "${TEST_MODELS:=$(cd "$B/fixtures" && ls -d tiny-mistral-* | paste -sd, -)}"
export TEST_MODELS
TOK=$(ls -d "$B"/fixtures/tiny-mistral-* | head -1)
for s in ${STEPS//,/ }; do
  echo "== $s $(date +%T)"
  case $s in
    tests) timeout 300 "$B/it" gpu:: --test-threads=1 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|panicked|rel err|differ" ;;
    # The wgmma kernels' tests, each in its own process (a fault in one
    # poisons the CUDA context of every later test in the process).
    tests-wg) for t in wgmma_prefill_products flash_prefill_matches flash_prefill_of_a_row the_padded_cublas; do
        timeout 120 "$B/it" "$t" --test-threads=1 2>&1 | tee -a "$OUT/tests-wg.log" | grep -E "^test |test result|panicked|err"
      done ;;
    kernels) timeout 300 "$B/runner" bench jobs/bench.toml --kernels --tokenizer "$TOK" \
        ${QUANT:+--set model.dummy_quant=$QUANT} --json "$OUT/kernels${QUANT:+-$QUANT}.json" 2>&1 | grep -v INFO ;;
    kernels:*) q=${s#kernels:}; timeout 300 "$B/runner" bench jobs/bench.toml --kernels --tokenizer "$TOK" \
        --set model.dummy_quant=$q --json "$OUT/kernels-$q.json" 2>&1 | grep -v INFO ;;
    W*) w=${s%%@*}; seqs=${s#*@}; [[ $seqs == "$s" ]] && seqs=256
      timeout ${WTIME:-300} "$B/runner" bench jobs/bench.toml --workload "$w" --scale "${SCALE:-1}" --tokenizer "$TOK" \
        ${QUANT:+--set model.dummy_quant=$QUANT} --set engine.max_num_seqs=$seqs \
        --json "$OUT/$w-$seqs.json" 2>&1 | grep -v " INFO " | tail -5 ;;
    peer*) b=${s#peer}; b=${b:-256}
      PYTHONUNBUFFERED=1 timeout 300 python3 benches/hf_peer.py --batch "$b" 2>&1 | tail -1 | tee "$OUT/peer$b.json" ;;
  esac
done
