# Sourced by kernels/build-cuda.sh and by anyone building `--features cuda`
# by hand: one fixed environment, so candle-kernels is not rebuilt (a changed
# variable or RUSTFLAGS rebuilds it, ~11 minutes on 2 cores).
# CUDA_HOME defaults to the toolkit kernels/cuda-toolchain.sh installs.
: "${CUDA_PREFIX:=$HOME/.cache/cuda-13.0}"
if [[ -z "${CUDA_HOME:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  else
    CUDA_HOME="$CUDA_PREFIX/nvidia/cu13"
  fi
fi
CUDA_PATH="$CUDA_HOME"
export CUDA_HOME
export CUDA_PATH
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
