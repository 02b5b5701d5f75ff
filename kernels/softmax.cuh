// The online softmax of the attention kernels, shared by the mma.sync
// kernels (attention.cu and its headers) and, by plan, the wgmma flash
// prefill (kernels/WGMMA-PREFILL-PLAN.md, step 2): f32 scores in the
// m16n8k16 / wgmma accumulator layout, exp as 2^(x log2 e) on MUFU.EX2.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// Two floats as an f16x2, round to nearest even (P's f16 rounding).
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 2^x (MUFU.EX2; relative error below 2^-22, far under the f16 rounding
// of P that follows).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#define LOG2E 1.4426950408889634f

// One online-softmax step over a warp's masked scores s[NJ][4] (rows g and
// g + 8 of an m16 tile; -inf where masked) whose per-lane row maxima,
// starting from the running maxima mrow, are in mx: the rows' maxima over
// the quad, the running sums rescaled by alpha (returned, for the caller's
// outputs; exactly 1 where the max did not move), s replaced by exp(s -
// max) = 2^(s log2 e - max log2 e) and added to the sums.
template <int NJ>
__device__ __forceinline__ void online_softmax(float (&s)[NJ][4], float* mx, float* mrow,
                                               float* lrow, float* alpha) {
  float base[2];
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
    base[hr] = mx[hr] == -INFINITY ? 0.f : mx[hr] * LOG2E;
    // Exactly 1 when the max did not move (the FMA would leave the
    // rounding error of max * log2 e): a row's tiles past its own keys then
    // change nothing, so its result does not depend on where tiles end.
    alpha[hr] = mx[hr] == mrow[hr]      ? 1.f
                : mrow[hr] == -INFINITY ? 0.f
                                        : ex2(fmaf(mrow[hr], LOG2E, -base[hr]));
    mrow[hr] = mx[hr];
    lrow[hr] *= alpha[hr];
  }
#pragma unroll
  for (int j = 0; j < NJ; j++)
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const float e = ex2(fmaf(s[j][r], LOG2E, -base[r >> 1]));  // 2^-inf = 0
      s[j][r] = e;
      lrow[r >> 1] += e;
    }
}
