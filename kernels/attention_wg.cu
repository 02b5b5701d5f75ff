// Hopper (sm_90a) pieces of the wgmma flash prefill (issue 15, item 3;
// kernels/WGMMA-PREFILL-PLAN.md). So far step 1 of the plan: a self-test
// of the two warpgroup products the kernel will be made of, over the
// shared-memory layout it will use, checked by the GPU test
// `gpu::attention::wgmma_prefill_products_match_float64`.
//
// The layout (Q, K and V alike; a "row" is a query row or a key): two
// panels, dims 0-63 and 64-127, each ROWS rows of 128 bytes; the 16-byte
// chunk c (0..15) of row r lies in panel c >> 3 at byte r * 128 + (((c & 7)
// ^ (r & 7)) << 4): the 128-byte swizzle, so the tile must start on a
// 1,024-byte boundary.
#include <cuda_fp16.h>
#include <stdint.h>

#include "wgmma.cuh"

#define WG_D 128

// Byte offset of chunk c of row r in a two-panel tile of `rows` rows.
__device__ __forceinline__ int sw128(int r, int c, int rows) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// A matrix descriptor of the 128-byte swizzle at p: leading and stride
// byte offsets `lbo` and `sbo` (multiples of 16).
__device__ __forceinline__ uint64_t wg_desc_sw128(const void* p, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  return (uint64_t)((a & 0x3ffff) >> 4) | ((uint64_t)((lbo >> 4) & 0x3fff) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3fff) << 32) | ((uint64_t)1 << 62);
}

// Copies `rows` rows of WG_D halves from global memory into the layout.
__device__ __forceinline__ void load_rows(uint8_t* dst, const half* src, int rows) {
  for (int i = threadIdx.x; i < rows * (WG_D / 8); i += blockDim.x) {
    const int r = i / (WG_D / 8), c = i % (WG_D / 8);
    *reinterpret_cast<int4*>(dst + sw128(r, c, rows)) =
        *reinterpret_cast<const int4*>(src + (size_t)r * WG_D + c * 8);
  }
}

// Writes a warpgroup's 64 x 128 f32 accumulator (wgmma.cuh's D layout)
// to out [64][128].
__device__ __forceinline__ void store_acc(float* out, const float (&d)[64]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < 64; i++) {
    const int row = 16 * warp + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
    out[row * 128 + col] = d[i];
  }
}

// One warpgroup (128 threads): S [64 x 128 keys] = Q K^T with Q [64][D]
// and K [128][D] both from shared memory (K-major), and O [64 x D] = P V
// with P [64][128 keys] from registers and V [128][D] read transposed
// (the B operand N-major), D = 128, f32 out. Dynamic shared memory:
// 80 KiB + 1,024 for the alignment.
extern "C" __global__ void __launch_bounds__(128)
    wg_prefill_selftest(const half* __restrict__ q, const half* __restrict__ k,
                        const half* __restrict__ p, const half* __restrict__ v,
                        float* __restrict__ s_out, float* __restrict__ o_out) {
  extern __shared__ uint8_t wg_smem[];
  uint8_t* const qs = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(wg_smem) + 1023) & ~(uintptr_t)1023);
  uint8_t* const ks = qs + 64 * 256;   // Q: 2 panels x 64 rows x 128 B
  uint8_t* const vs = ks + 128 * 256;  // K: 2 panels x 128 rows x 128 B
  load_rows(qs, q, 64);
  load_rows(ks, k, 128);
  load_rows(vs, v, 128);
  // The stores above are the generic proxy's; the products read through
  // the async proxy.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();

  // S = Q K^T: 8 k-steps of 16 dims, 32 bytes apart within a panel.
  float s[64];
#pragma unroll
  for (int i = 0; i < 64; i++) s[i] = 0.f;
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const int off = (kk & 3) * 32;
    const uint64_t da = wg_desc_sw128(qs + (kk >> 2) * 64 * 128 + off, 16, 1024);
    const uint64_t db = wg_desc_sw128(ks + (kk >> 2) * 128 * 128 + off, 16, 1024);
    wg_ss_m64n128k16(s, da, db);
  }
  wg_commit();
  wg_wait<0>();
  store_acc(s_out, s);

  // O = P V: P's m16n8k16 A fragments (rows 16w + g and + 8, columns 2t,
  // 2t + 1, 2t + 8, 2t + 9 of each 16-key step), all loaded before the
  // products start; V's k-step kk is keys 16kk..16kk+15 (2,048 bytes on),
  // its two 64-dim panels 128 x 128 bytes apart (the leading offset).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  uint32_t a[8][4];
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const half* r0 = p + (size_t)(16 * warp + g) * 128 + kk * 16 + 2 * t;
    const half* r1 = r0 + 8 * 128;
    a[kk][0] = *reinterpret_cast<const uint32_t*>(r0);
    a[kk][1] = *reinterpret_cast<const uint32_t*>(r1);
    a[kk][2] = *reinterpret_cast<const uint32_t*>(r0 + 8);
    a[kk][3] = *reinterpret_cast<const uint32_t*>(r1 + 8);
  }
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; i++) o[i] = 0.f;
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const uint64_t db = wg_desc_sw128(vs + kk * 16 * 128, 128 * 128, 1024);
    wg_m64n128k16_tb(o, a[kk], db);
  }
  wg_commit();
  wg_wait<0>();
  store_acc(o_out, o);
}
