#!/usr/bin/env bash
# The device sampler's cost: W1 at 512 sequences on dense dummy weights
# (GPTQ dummy weights give non-finite logits on the GPU), greedy and then
# with each device route: the whole-row draw (temperature only), top-k
# candidates, top-p from 256 candidates. Scale $SCALE (default 0.5) of W1's
# prompts. Run on the device after benches/device.sh unpacked the bundle.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
B=/tmp/rb; TOK=$(ls -d "$B"/fixtures/tiny-mistral-* | head -1)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for s in "greedy:" "draw:--set generation.temperature=0.8" \
  "topk40:--set generation.temperature=0.8 --set generation.top_k=40" \
  "topp95:--set generation.temperature=0.8 --set generation.top_p=0.95" \
  "penalty:--set generation.temperature=0.8 --set generation.top_k=40 --set generation.repetition_penalty=1.1"; do
  name=${s%%:*}; args=${s#*:}
  echo "== $name $(date +%T)"
  # shellcheck disable=SC2086
  timeout 200 "$B/runner" bench jobs/bench.toml --workload W1 --scale "${SCALE:-0.5}" --tokenizer "$TOK" \
    --set model.dummy_quant=none --set engine.max_num_seqs=512 $args --json "$OUT/sampled-$name.json" 2>&1 \
    | grep -v " INFO " | tail -2
done
