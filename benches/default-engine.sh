#!/usr/bin/env bash
# On the GPU machine: `runner submit` of a job with no [engine] keys on
# dummy Mistral-7B weights (TheBloke main quantization), to read the
# automatic device choice and KV cache size from the start-up log.
#   benches/default-engine.sh RUNNER_BIN TOKENIZER_DIR
set -uo pipefail
BIN=$1 TOK=$2 OUT=${OUT:-/tmp/out}
M=/tmp/m7b; mkdir -p "$M" "$OUT"
cp configs/mistral-7b-openorca/config.json "$M/"; cp "$TOK"/tokenizer* "$TOK"/special_tokens_map.json "$M/" 2>/dev/null
cat > /tmp/default-engine.toml <<EOT
[model]
id = "$M"
load_format = "dummy"

[input]
path = "$PWD/jobs/data/prompts.parquet"

[generation]
max_new_tokens = 64

[output]
path = "/tmp/default-engine-out"
EOT
"$BIN" submit /tmp/default-engine.toml 2>&1 | tee "$OUT/default-engine.log" | grep -E "engine.device|gpu memory|kv cache|job finished|error"
