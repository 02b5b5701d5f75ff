#!/usr/bin/env bash
# Dataset-generation costs on a lent GPU, all through one binary in one call,
# alternating so that every variant sees the same card and clocks:
#   base   W1 (2048 distinct prompts x 128 out)
#   n4     W1 at a quarter of the prompts (512) with generation.n = 4
#          (the same 2048 rows; the samples fork from one prefill)
#   lp5    W1 with output.logprobs = 5
#   js     W1 with generation.json_schema_file = benches/bench-schema.json
#          (an array of at least 20 {name, age, tag} objects: 128 tokens never finish it)
# VARIANTS picks some (default: base n4 lp5 js).
# Usage (on the device, from the repo root, after benches/device.sh unpacked
# the bundle into /tmp/rb): benches/datagen.sh BIN TOKENIZER_DIR SEQS ROUNDS
# JSON per run lands in $OUT as <variant>-<round>.json.
set -uo pipefail
BIN=$1 TOK=$2 SEQS=${3:-512} ROUNDS=${4:-2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
run() { # name round extra...
  local name=$1 round=$2; shift 2
  echo "== $name round $round $(date +%T)"
  timeout ${WTIME:-200} "$BIN" bench jobs/bench.toml --workload W1 --tokenizer "$TOK" \
    --set engine.max_num_seqs="$SEQS" --json "$OUT/$name-$round.json" "$@" 2>&1 | grep -v " INFO " | tail -2
}
for r in $(seq 1 "$ROUNDS"); do
  for v in ${VARIANTS:-base n4 lp5 js}; do
    case $v in
      base) run base "$r" ;;
      n4) run n4 "$r" --scale 0.25 --set generation.n=4 ;;
      lp5) run lp5 "$r" --set output.logprobs=5 ;;
      js) run js "$r" --set generation.json_schema_file=benches/bench-schema.json ;;
    esac
  done
done
