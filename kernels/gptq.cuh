// Shared by the GPTQ kernel files: GPTQ's exact f16 dequantization of one
// 16 x 16 weight tile in the tile layout (described at the top of gptq.cu).
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t h2u(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ half2 u2h(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// Dequantizes the 4 fragment registers of one tile. rows g use (s0, z0),
// rows g+8 use (s1, z1): registers 0 and 2 are rows g, 1 and 3 rows g+8.
template <int BITS>
__device__ __forceinline__ void dequant_tile(const uint32_t* w, half2 s0, half2 z0, half2 s1,
                                             half2 z1, uint32_t* a) {
#pragma unroll
  for (int r = 0; r < 4; r++) {
    uint32_t v;
    if (BITS == 4) {
      v = ((w[0] >> (4 * r)) & 0x000f000fu) | 0x64006400u;
    } else {
      v = ((w[r >> 1] >> (8 * (r & 1))) & 0x00ff00ffu) | 0x64006400u;
    }
    half2 s = (r & 1) ? s1 : s0;
    half2 z = (r & 1) ? z1 : z0;
    a[r] = h2u(__hmul2(__hsub2(u2h(v), z), s));
  }
}

