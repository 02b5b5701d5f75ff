#!/usr/bin/env bash
# One device call of a kernel change: GPU tests, the kernel tables of the
# binaries in $KERNEL_BINS (default: runner-base and runner), the workloads
# in $AB (default W1@512,W1@512) A/B alternating between the baseline
# (runner-base) and the new binary, then the new binary's breakdowns.
# Usage on the device: OUT=$OUT bash benches/session.sh
# Everything lands in $OUT/results.tgz, packed again after every step: the
# device tool brings back only a few files per call, and a call cut by its
# 600 s limit keeps what the steps before the cut wrote. A W3 A/B pair alone
# takes ~150 s and a W2 pair ~240 s: plan a call's steps under 600 s.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
export TEST_MODELS=${TEST_MODELS:-tiny-mistral-gptq-4bit-128g-actorder_True,tiny-mistral-gptq-8bit--1g-actorder_True}
PACK=${OUT:-/tmp/out}; mkdir -p "$PACK"
export OUT=/tmp/session-results; mkdir -p "$OUT"
pack() { tar czf "$PACK/results.tgz.tmp" -C "$OUT" . && mv "$PACK/results.tgz.tmp" "$PACK/results.tgz"; }
STEPS=tests bash benches/device.sh
pack
B=/tmp/rb; TOK=$(ls -d "$B"/fixtures/tiny-mistral-* | head -1)
if [[ -z "${NOKERNELS:-}" ]]; then
  for bin in ${KERNEL_BINS:-runner-base runner}; do
    echo "== kernels $bin $(date +%T)"
    timeout 200 "$B/$bin" bench jobs/bench.toml --kernels --tokenizer "$TOK" --json "$OUT/kernels-$bin.json" 2>&1 \
      | grep -v INFO | grep -A40 "decode attention"
    pack
  done
fi
ab_list=${AB-W1@512,W1@512}
for s in ${ab_list//,/ }; do
  bash benches/ab.sh "$B/runner-base" "$B/runner" "$TOK" "$s"
  pack
done
# Breakdowns: $BREAKDOWNS, comma-separated W@seqs[:scale] (default W1@512).
b_list=${BREAKDOWNS-W1@512}
for s in ${b_list//,/ }; do
  w=${s%%@*}; rest=${s#*@}; seqs=${rest%%:*}; scale=1
  [[ $rest == *:* ]] && scale=${rest#*:}
  echo "== breakdown $s $(date +%T)"
  timeout 200 "$B/runner" bench jobs/bench.toml --workload "$w" --scale "$scale" --tokenizer "$TOK" \
    --set engine.max_num_seqs="$seqs" --breakdown > "$OUT/breakdown-$w-$seqs.txt" 2>&1
  grep -v INFO "$OUT/breakdown-$w-$seqs.txt" | tail -40
  pack
done
