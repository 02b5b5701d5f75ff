#!/usr/bin/env bash
# Debug aid: a JSON-schema job on dummy 7B weights (the bench's shapes) through
# `runner submit`, its rows printed through `runner export`. Usage (on the
# device, after benches/device.sh unpacked the bundle): benches/js-debug.sh
set -uo pipefail
B=/tmp/rb; TOK=$(ls -d $B/fixtures/tiny-mistral-* | head -1)
M=/tmp/m7; mkdir -p $M /tmp/jsd
cp configs/mistral-7b-openorca/config.json $M/
cp $TOK/tokenizer.json $TOK/tokenizer_config.json $TOK/special_tokens_map.json $M/ 2>/dev/null
for i in 1 2 3 4; do echo "{\"id\": \"r$i\", \"prompt\": \"List people $i.\"}"; done > /tmp/jsd/in.jsonl
cat > /tmp/jsd/job.toml <<EOT
[model]
id = "$M"
load_format = "dummy"
dummy_quant = "4bit-128g"
[input]
path = "in.jsonl"
[generation]
max_new_tokens = 24
ignore_eos = true
json_schema_file = "$PWD/benches/bench-schema.json"
[output]
path = "out"
include_token_ids = true
[engine]
device = "cuda"
max_num_seqs = 4
kv_cache_mib = 4096
EOT
(cd /tmp/jsd && RUNNER_LOG=warn $B/runner submit job.toml 2>&1 | cut -c1-400 | head -20; $B/runner export out --format openai_batch 2>&1 | cut -c1-600)
