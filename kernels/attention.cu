// Attention over the paged KV cache, and the cache write.
//
// Cache layout per layer: K and V as f16 rows [num_blocks * block_size,
// kv_heads * D]; a sequence's position p lives in row
// block_table[p / block_size] * block_size + p % block_size.
// Sliding window: query at position i sees keys i - W < j <= i (W = 0: all).
//
// FP8 cache (engine.kv_cache_dtype = "fp8"): K and V rows of E4M3 codes (a
// byte per value, same row layout) and f32 scales [slots, kv_heads], one
// per token and KV head: the value is f16(decode(code) * scale), the CPU
// cache's arithmetic (src/quant/fp8.rs) rounded to the f16 the kernels
// multiply. The attention kernels' *_f8 builds stream the codes and scales
// through shared memory and widen each tile there before the same
// tensor-core arithmetic as the f16 builds.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <float.h>
#include <stdint.h>

#include "mma.cuh"
#include "softmax.cuh"

// Copies n rows of `row` halves (k and v, rows ks and vs halves apart: a
// column slice of a fused q/k/v output is read in place) to their cache slots.
extern "C" __global__ void kv_write(const half* __restrict__ k, const half* __restrict__ v,
                                    half* __restrict__ kc, half* __restrict__ vc,
                                    const int* __restrict__ slots, int n, int row, int ks,
                                    int vs) {
  int vecs = row / 8;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)n * vecs) return;
  int r = i / vecs, c = i % vecs;
  size_t dst = (size_t)slots[r] * row + c * 8;
  *reinterpret_cast<int4*>(kc + dst) = *reinterpret_cast<const int4*>(k + (size_t)r * ks + c * 8);
  *reinterpret_cast<int4*>(vc + dst) = *reinterpret_cast<const int4*>(v + (size_t)r * vs + c * 8);
}

// The FP8 cache write: one warp per (token, kv head, K or V) row of D
// values (k and v rows ks and vs halves apart): scale = max(amax / 448,
// FLT_MIN) over the row's finite values (1 for a row of zeros), codes =
// e4m3(x / scale), nearest-even and saturating -- quant::fp8::quantize_row
// on the same values, bit for bit.
extern "C" __global__ void kv_write_fp8(const half* __restrict__ k, const half* __restrict__ v,
                                        uint8_t* __restrict__ kc, uint8_t* __restrict__ vc,
                                        float* __restrict__ ksc, float* __restrict__ vsc,
                                        const unsigned* __restrict__ slots, int n, int nk, int D,
                                        int ks, int vs) {
  const size_t w = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (w >= (size_t)n * nk * 2) return;  // (whole warps: blockDim is a multiple of 32)
  const bool isv = w & 1;
  const size_t r = (w >> 1) / nk;
  const int h = (int)((w >> 1) % nk);
  const half* src = (isv ? v + r * vs : k + r * ks) + (size_t)h * D;
  float amax = 0.f;
  for (int i = lane; i < D; i += 32) {
    const float x = __half2float(src[i]);
    if (isfinite(x)) amax = fmaxf(amax, fabsf(x));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float sc = amax > 0.f ? fmaxf(amax / 448.f, FLT_MIN) : 1.f;
  const size_t slot = slots[r];
  uint8_t* dst = (isv ? vc : kc) + (slot * nk + h) * D;
  for (int i = lane; i < D; i += 32)
    dst[i] = __nv_cvt_float_to_fp8(__half2float(src[i]) / sc, __NV_SATFINITE, __NV_E4M3);
  if (lane == 0) (isv ? vsc : ksc)[slot * nk + h] = sc;
}

// Copies n rows of `words` 32-bit words of src (dense) to rows to[r] of
// dst: the FP8 cache's block copies (codes and scales).
extern "C" __global__ void scatter_rows_b32(const unsigned* __restrict__ src,
                                            unsigned* __restrict__ dst,
                                            const unsigned* __restrict__ to, int n, int words) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)n * words) return;
  const size_t r = i / words, c = i % words;
  dst[(size_t)to[r] * words + c] = src[i];
}

// Two E4M3 codes (the low byte first) as an f16x2, exactly.
__device__ __forceinline__ uint32_t e4m3x2_h2(uint32_t two) {
  const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)two, __NV_E4M3);
  return (uint32_t)r.x | ((uint32_t)r.y << 16);
}

// 16 E4M3 codes at src (16-byte aligned) times the row's scale, as 16
// halves at dst (16-byte aligned): f16(decode(code) * scale). Every E4M3
// value is exact in f16, so the widening is exact and the one rounding is
// the product's.
__device__ __forceinline__ void dequant16(const uint8_t* src, float sc, half* dst) {
  const uint4 w = *reinterpret_cast<const uint4*>(src);
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
  uint32_t h[8];
#pragma unroll
  for (int i = 0; i < 8; i++) {
    // Codes 2i (low byte) and 2i + 1: the half2's .x and .y.
    const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(
        (__nv_fp8x2_storage_t)((ws[i >> 1] >> (16 * (i & 1))) & 0xffffu), __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const half2*>(&raw));
    const half2 o = __floats2half2_rn(f.x * sc, f.y * sc);
    h[i] = *reinterpret_cast<const uint32_t*>(&o);
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(h[0], h[1], h[2], h[3]);
  *reinterpret_cast<uint4*>(dst + 8) = make_uint4(h[4], h[5], h[6], h[7]);
}

// N codes at p (N-byte aligned; N = 2, 4, 8 or 16) into w, the first in
// the low byte of w[0].
template <int N>
__device__ __forceinline__ void load_codes(const uint8_t* p, uint32_t (&w)[(N + 3) / 4]) {
  if constexpr (N == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else if constexpr (N == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  } else if constexpr (N == 4) {
    w[0] = *reinterpret_cast<const uint32_t*>(p);
  } else {
    w[0] = *reinterpret_cast<const uint16_t*>(p);
  }
}

// One n-tile of S = Q K^T: the 8 keys of `krows` (rows RS halves apart)
// against a warp's Q fragments `qa` over KS k-steps of 16 dims; s = 0 + QK.
template <int KS, int RS>
__device__ __forceinline__ void qk_tile(float* s, const uint32_t (*qa)[4], const half* krows,
                                        int lane) {
#pragma unroll
  for (int r = 0; r < 4; r++) s[r] = 0.f;
  if (KS == 1) {
    uint32_t b[2];  // m0/m1: the 8 keys, d 0 (+8)
    ldsm_x2(b, krows + (lane & 7) * RS + ((lane >> 3) & 1) * 8);
    mma_16816(s, qa[0], b[0], b[1]);
  } else {
#pragma unroll
    for (int s2 = 0; s2 < KS; s2 += 2) {
      // m0/m1: the 8 keys, d 16*s2 (+8); m2/m3: d 16*(s2+1) (+8).
      uint32_t b[4];
      ldsm_x4(b, krows + (lane & 7) * RS + s2 * 16 + ((lane >> 3) & 1) * 8 + (lane >> 4) * 16);
      mma_16816(s, qa[s2], b[0], b[1]);
      mma_16816(s, qa[s2 + 1], b[2], b[3]);
    }
  }
}

// The two kernels' families, one translation unit (one PTX module).
#include "attention_decode.cuh"
#include "attention_prefill.cuh"
