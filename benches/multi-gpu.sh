#!/usr/bin/env bash
# One job over every GPU of a host against one GPU, in one call on one
# machine, alternating: W1 (token-id prompts x 128 out, at $SCALE of its
# 2,048 prompts) through `runner bench` with engine.device = cuda:0, then
# with engine.devices = "all" (one engine per GPU, records handed out on
# demand, one sink). Unpacks dev/bundle.tar.xz like benches/device.sh.
# Usage (from the repo root on the device): SEQS=512 SCALE=2 ROUNDS=2 benches/multi-gpu.sh
# JSON per run lands in $OUT as one-<round>.json / all-<round>.json.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
B=/tmp/rb
[[ -x $B/runner ]] || { mkdir -p "$B" && tar xJf dev/bundle.tar.xz -C "$B" || exit 1; }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
export BENCH_COMMIT=$(cat dev/COMMIT 2>/dev/null)
echo "commit $BENCH_COMMIT"
TOK=$(ls -d "$B"/fixtures/tiny-mistral-* | head -1)
SEQS=${SEQS:-512} SCALE=${SCALE:-2} ROUNDS=${ROUNDS:-2}
for r in $(seq 1 "$ROUNDS"); do
  for v in one all; do
    case $v in
      one) set=(--set engine.device=cuda:0) ;;
      all) set=(--set engine.devices=all) ;;
    esac
    echo "== $v round $r $(date +%T)"
    timeout ${WTIME:-240} "$B/runner" bench jobs/bench.toml --workload W1 --scale "$SCALE" --tokenizer "$TOK" \
      --set engine.max_num_seqs="$SEQS" "${set[@]}" --json "$OUT/$v-$r.json" 2>&1 | grep -v " INFO " | tail -3
  done
done
