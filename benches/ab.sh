#!/usr/bin/env bash
# A/B workloads on a lent GPU: the same `runner bench` workloads through two
# binaries in one call, alternating (A, B, A, B ...) so that both see the
# same card and clocks. Usage (on the device, from the repo root):
#   benches/ab.sh A_BIN B_BIN TOKENIZER_DIR W1@512,W3@160
# JSON per run lands in $OUT as <label>-<workload>-<seqs>.json (label a|b;
# a repeated workload adds -2, -3 ...). A_ARGS / B_ARGS: extra arguments of
# each side (e.g. B_ARGS="--set engine.kv_cache_dtype=fp8" with A = B: one
# binary, two settings).
# The first workload of a call runs on a cold card (clocks, the driver's
# PTX cache: W4 took 14.2 s cold against 5.1 s warm in run 45), so each
# binary first runs a small untimed W1 (WARMUP=0 skips it).
set -uo pipefail
A=$1 B=$2 TOK=$3 STEPS=$4
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [[ ${WARMUP:-1} != 0 ]]; then
  for bin in "$A" "$B"; do
    timeout 120 "$bin" bench jobs/bench.toml --workload W1 --scale 0.1 --tokenizer "$TOK" >/dev/null 2>&1
  done
fi
for s in ${STEPS//,/ }; do
  w=${s%%@*}; seqs=${s#*@}; [[ $seqs == "$s" ]] && seqs=256
  for pair in "a:$A" "b:$B"; do
    label=${pair%%:*}; bin=${pair#*:}
    extra=${A_ARGS:-}; [[ $label == b ]] && extra=${B_ARGS:-}
    echo "== $label $w@$seqs $(date +%T)"
    json="$OUT/$label-$w-$seqs.json"; n=2
    while [[ -e $json ]]; do json="$OUT/$label-$w-$seqs-$n.json"; n=$((n + 1)); done  # a repeat keeps the earlier run
    timeout ${WTIME:-300} "$bin" bench jobs/bench.toml --workload "$w" --tokenizer "$TOK" \
      --set engine.max_num_seqs="$seqs" $extra --json "$json" 2>&1 | awk '!/ INFO / || /cuda graphs|device time of/' | tail -4
  done
done
