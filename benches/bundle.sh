#!/usr/bin/env bash
# Builds dev/bundle.tar.xz for benches/device.sh: the `cuda` release binary,
# the integration-test binary and the fixture folders named as arguments
# (references and the tokenizer always), under 64 MiB in all. BASE_BIN=path
# adds a baseline `runner` (e.g. the parent commit's) as runner-base, for
# benches/ab.sh; ALT_BIN=path a third, as runner-alt. CARGO_TARGET_DIR is
# respected.
set -euo pipefail
cd "$(dirname "$0")/.."
source kernels/cuda-env.sh
cargo build --release --features cuda
it=$(cargo test --release --features cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys,json
for l in sys.stdin:
  m=json.loads(l)
  if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="it" and m.get("executable"): print(m["executable"])')
s=$(mktemp -d); mkdir -p "$s/fixtures" dev
T=${CARGO_TARGET_DIR:-target}
cp "$T/release/runner" "$s/runner"; cp "$it" "$s/it"; strip "$s/runner" "$s/it"
if [[ -n "${BASE_BIN:-}" ]]; then cp "$BASE_BIN" "$s/runner-base"; strip "$s/runner-base"; fi
if [[ -n "${ALT_BIN:-}" ]]; then cp "$ALT_BIN" "$s/runner-alt"; strip "$s/runner-alt"; fi
FX=${FIXTURES:-../shared/fixtures}
cp -r "$FX/references" "$FX/tokenizer" "$FX/README.md" "$s/fixtures/"
for m in "$@"; do cp -r "$FX/$m" "$s/fixtures/"; done
# -9: the cuda binaries grew with candle 0.11. A 256 MiB dictionary holds
# all of `runner` when runner-base follows it, so the base costs only what
# differs (most of both is the same embedded PTX and candle kernels).
files=(runner); for f in runner-base runner-alt; do [[ -e $s/$f ]] && files+=($f); done
tar cf - -C "$s" "${files[@]}" it fixtures | xz -T1 --lzma2=preset=9,dict=256MiB > dev/bundle.tar.xz
git rev-parse --short HEAD > dev/COMMIT
ls -la dev/bundle.tar.xz
