#!/usr/bin/env bash
# A job over several devices with one of them failing mid-run, then a
# resume: every record must end up written exactly once (issue 17's fault
# run). The failure is the test-only RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS=N@K
# (engine K of engine.devices fails at step N + 1, as a device fault would).
# The resubmit is the check: resume reads every part back and refuses an
# (id, sample) written twice; `runner status` must then say finished with
# every record written.
#
# Usage: benches/fault-run.sh BIN MODEL_DIR [DEVICES] [RECORDS] [FAULT]
#   DEVICES  engine.devices as TOML (default "all"), e.g. '["cpu", "cpu"]'
#   RECORDS  prompts in the job (default 4000); FAULT N@K (default 40@1)
# MODEL_DIR: a model directory with config.json and tokenizer.json; with
# DUMMY=4bit-128g (or another branch) the weights are random (benchmarks).
# On a lent GPU machine, after benches/device.sh unpacked the bundle:
#   mkdir -p /tmp/m && cp configs/mistral-7b-openorca/config.json /tmp/rb/fixtures/tokenizer/* /tmp/m/
#   DUMMY=4bit-128g benches/fault-run.sh /tmp/rb/runner /tmp/m '"all"' 8000 40@1
# Checked on the CPU with two engines on the fixture model:
#   DTYPE=f32 DUMMY=8bit--1g MAX_NEW=12 SEQS=8 benches/fault-run.sh target/debug/runner \
#     ../shared/fixtures/tiny-mistral-gptq-8bit--1g-actorder_True '["cpu", "cpu"]' 120 15@1
set -uo pipefail
BIN=$1 MODEL=$2 DEVICES=${3:-'"all"'} N=${4:-4000} FAULT=${5:-40@1}
W=${WORK:-$(mktemp -d)}
mkdir -p "$W"
for i in $(seq 0 $((N - 1))); do
  printf '{"id": "f%05d", "prompt": "Write a short note number %d about rivers and %s."}\n' "$i" "$i" "$(printf 'x%.0s' $(seq 1 $((i % 7))))"
done > "$W/p.jsonl"
cat > "$W/job.toml" <<TOML
[model]
id = "$MODEL"
${DUMMY:+load_format = \"dummy\"}
${DUMMY:+dummy_quant = \"$DUMMY\"}
${DTYPE:+dtype = \"$DTYPE\"}

[input]
path = "p.jsonl"

[generation]
max_new_tokens = ${MAX_NEW:-64}
ignore_eos = true

[output]
path = "out"
flush_every = 256

[engine]
devices = $DEVICES
max_num_seqs = ${SEQS:-256}
TOML
cd "$W" || exit 1
echo "== submit with engine $FAULT failing $(date +%T)"
RUNNER_TEST_DEVICE_FAULT_AFTER_STEPS=$FAULT "$BIN" submit job.toml 2>&1 | grep -vE " INFO |progress" | tail -3
echo "exit code ${PIPESTATUS[0]} (4: a device failed)"
"$BIN" status out | head -4
echo "== resubmit $(date +%T)"
"$BIN" submit job.toml 2>&1 | grep -vE " INFO |progress" | tail -3
rc=${PIPESTATUS[0]}
"$BIN" status out | tee status.txt | head -6
if [[ $rc == 0 ]] && grep -q "state       finished" status.txt && grep -q "records     $N of $N written" status.txt; then
  echo "fault run: every one of $N records written exactly once"
else
  echo "fault run: FAILED (rc $rc)"; exit 1
fi
