// GPTQ matrix products on f16 tensor cores (mma.sync m16n8k16, f32 accumulate).
//
// Weights are repacked once at load (src/cuda/gptq.rs) into a tile layout:
// K is first sorted by g_idx (act-order), so that every group is a run of
// `gs` consecutive sorted positions, then padded to Kp (multiple of 64);
// N is padded to Np (multiple of 64). Each 16(n) x 16(k) tile is what one
// warp feeds to the A operand of an m16n8k16 mma; lane L = 4*g + t holds the
// 8 values
//   a0 = W[n0+g][k0+2t]   a1 = W[n0+g][k0+2t+1]   a2 = W[n0+g+8][k0+2t]
//   a3 = W[n0+g+8][k0+2t+1] a4..a7 = the same with k + 8
// of the quantized integers. 4-bit: one word per tile per lane, value a_i at
// nibble {0,4,1,5,2,6,3,7}[i], so register r of the fragment is
// ((w >> 4r) & 0x000f000f) | 0x64006400 = half2(1024 + lo, 1024 + hi).
// 8-bit: two words per tile per lane (a0..a3, a4..a7), value order
// {0,2,1,3} by byte, register r = ((w >> 8r) & 0x00ff00ff) | 0x64006400.
// A lane's words for consecutive k-tiles are adjacent, so it loads one int4
// per 64 k (4-bit) or per 32 k (8-bit); a warp reads 512 contiguous bytes.
//
// Dequantization is exactly GPTQ's f16 arithmetic: (1024+q) - (1024+z) is an
// exact small integer, times the f16 scale rounds once, as in
// `scales * (q - zeros)` computed in f16 by AutoGPTQ/GPTQModel. `sz[g][n]`
// holds half2(scale, 1024 + zero).
//
// The activation x [M, K] (original column order) is first gathered through
// `perm` (sorted position -> original column, -1 for padding) into xp
// [Mp, Kp] by gptq_permute_x, then read into shared memory per block. The reduction order of every output element is fixed: k-tiles in
// order inside a split, splits summed in order by gptq_reduce, whatever M is.
#include <cuda_fp16.h>
#include <stdint.h>

#define KSPLIT_K 512  // sorted positions of K per block (multiple of 64)

__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

// xp[m][k] = x[m][perm[k]] (0 for padded rows/positions): the activation in
// sorted-K order, rows padded to the token slabs, so that the product kernel
// fills shared memory with contiguous 16-byte loads.
extern "C" __global__ void gptq_permute_x(const half* __restrict__ x, const int* __restrict__ perm,
                                          half* __restrict__ xp, int M, int K, int Mp, int Kp) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)Mp * Kp) return;
  int m = i / Kp, k = i % Kp;
  int src = perm[k];
  xp[i] = (m < M && src >= 0) ? x[(size_t)m * K + src] : __float2half(0.f);
}

// One block: 4 warps, each one 16-column tile (64 columns per block), over
// the sorted positions [blockIdx.y * KSPLIT_K, +KSPLIT_K), for token slab
// blockIdx.z (MT*8 tokens of xp). Writes f32 partials part[blockIdx.y][m][n].
template <int BITS, int MT>
__device__ void gptq_mma_impl(const half* __restrict__ xp, const int4* __restrict__ qt,
                              const half2* __restrict__ sz, float* __restrict__ part, int M,
                              int N, int Np, int Kp, int gs, int G) {
  constexpr int STRIDE = KSPLIT_K + 8;  // halves; +16 bytes avoids bank conflicts
  __shared__ __align__(16) half xs[MT * 8 * STRIDE];
  const int kbase = blockIdx.y * KSPLIT_K;
  const int klen = min(KSPLIT_K, Kp - kbase);
  const int mbase = blockIdx.z * MT * 8;
  {
    const int vecs = klen / 8;  // int4 per row
    for (int i = threadIdx.x; i < MT * 8 * vecs; i += blockDim.x) {
      int m = i / vecs, c = i % vecs;
      *reinterpret_cast<int4*>(xs + m * STRIDE + c * 8) =
          *reinterpret_cast<const int4*>(xp + (size_t)(mbase + m) * Kp + kbase + c * 8);
    }
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int nt = blockIdx.x * 4 + warp;
  const int n0 = nt * 16;
  if (n0 >= Np) return;
  // k per int4 load: 64 for 4-bit (4 tiles), 32 for 8-bit (2 tiles).
  constexpr int KPL = BITS == 4 ? 64 : 32;
  constexpr int TPL = KPL / 16;
  constexpr int DEPTH = 4;  // int4 loads in flight per lane
  const int KQ = Kp / KPL;
  float acc[MT][4];
#pragma unroll
  for (int i = 0; i < MT; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
  const int4* src = qt + ((size_t)nt * KQ + kbase / KPL) * 32 + lane;
  const int steps = klen / KPL;
  int cur = -1;
  half2 s0, z0, s1, z1;
  int4 buf[DEPTH];
#pragma unroll
  for (int d = 0; d < DEPTH; d++) buf[d] = d < steps ? src[(size_t)d * 32] : make_int4(0, 0, 0, 0);
  for (int q0 = 0; q0 < steps; q0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; d++) {
      const int q = q0 + d;
      if (q >= steps) break;
      int4 w4 = buf[d];
      if (q + DEPTH < steps) buf[d] = src[(size_t)(q + DEPTH) * 32];
      const uint32_t w[4] = {(uint32_t)w4.x, (uint32_t)w4.y, (uint32_t)w4.z, (uint32_t)w4.w};
#pragma unroll
      for (int j = 0; j < TPL; j++) {
        const int kk = q * KPL + j * 16;  // within the block's range
        int grp = min((kbase + kk) / gs, G - 1);
        if (grp != cur) {
          cur = grp;
          half2 a = sz[(size_t)grp * Np + n0 + g];
          half2 b = sz[(size_t)grp * Np + n0 + g + 8];
          s0 = __low2half2(a);
          z0 = __high2half2(a);
          s1 = __low2half2(b);
          z1 = __high2half2(b);
        }
        uint32_t a[4];
        dequant_tile<BITS>(BITS == 4 ? &w[j] : &w[2 * j], s0, z0, s1, z1, a);
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          const half* row = xs + (mt * 8 + g) * STRIDE + kk + 2 * t;
          uint32_t b0 = *reinterpret_cast<const uint32_t*>(row);
          uint32_t b1 = *reinterpret_cast<const uint32_t*>(row + 8);
          mma_16816(acc[mt], a, b0, b1);
        }
      }
    }
  }
  float* out = part + (size_t)blockIdx.y * M * N;
#pragma unroll
  for (int mt = 0; mt < MT; mt++) {
    int m = mbase + mt * 8 + 2 * t;
    int na = n0 + g, nb = n0 + g + 8;
    if (m < M && na < N) out[(size_t)m * N + na] = acc[mt][0];
    if (m + 1 < M && na < N) out[(size_t)(m + 1) * N + na] = acc[mt][1];
    if (m < M && nb < N) out[(size_t)m * N + nb] = acc[mt][2];
    if (m + 1 < M && nb < N) out[(size_t)(m + 1) * N + nb] = acc[mt][3];
  }
}

#define GPTQ_MMA(BITS, MT)                                                                 \
  extern "C" __global__ void __launch_bounds__(128)                                       \
      gptq_mma_b##BITS##_m##MT(const half* xp, const int4* qt, const half2* sz, float* part, \
                               int M, int N, int Np, int Kp, int gs, int G) {              \
    gptq_mma_impl<BITS, MT>(xp, qt, sz, part, M, N, Np, Kp, gs, G);                         \
  }
GPTQ_MMA(4, 1)
GPTQ_MMA(4, 2)
GPTQ_MMA(4, 4)
GPTQ_MMA(8, 1)
GPTQ_MMA(8, 2)
GPTQ_MMA(8, 4)

// out[m][n] = f16(sum over splits in order of part[s][m][n]).
extern "C" __global__ void gptq_reduce(const float* __restrict__ part, half* __restrict__ out,
                                       int MN, int splits) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= MN) return;
  float s = 0.f;
  for (int j = 0; j < splits; j++) s += part[(size_t)j * MN + i];
  out[i] = __float2half(s);
}

// Dequantizes the whole weight into f16 W^T [K, N] in original row order
// (row perm[k] for sorted position k; padding is skipped), for the cuBLAS
// path. One thread per (tile column, int4 load, lane).
template <int BITS>
__device__ void gptq_dequant_impl(const int* __restrict__ perm, const int4* __restrict__ qt,
                                  const half2* __restrict__ sz, half* __restrict__ wt, int K,
                                  int N, int Np, int Kp, int gs, int G) {
  constexpr int KPL = BITS == 4 ? 64 : 32;
  constexpr int TPL = KPL / 16;
  const int KQ = Kp / KPL;
  size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  size_t total = (size_t)(Np / 16) * KQ * 32;
  if (idx >= total) return;
  int lane = idx & 31;
  int q = (idx >> 5) % KQ;
  int nt = (idx >> 5) / KQ;
  int g = lane >> 2, t = lane & 3;
  int n0 = nt * 16;
  int4 w4 = qt[idx];
  const uint32_t w[4] = {(uint32_t)w4.x, (uint32_t)w4.y, (uint32_t)w4.z, (uint32_t)w4.w};
#pragma unroll
  for (int j = 0; j < TPL; j++) {
    int k0 = q * KPL + j * 16;
    int grp = min(k0 / gs, G - 1);
    half2 a = sz[(size_t)grp * Np + n0 + g];
    half2 b = sz[(size_t)grp * Np + n0 + g + 8];
    uint32_t r[4];
    dequant_tile<BITS>(BITS == 4 ? &w[j] : &w[2 * j], __low2half2(a), __high2half2(a),
                       __low2half2(b), __high2half2(b), r);
    // register r: rows (g | g+8), k columns (2t, 2t+1) + (0 | 8).
#pragma unroll
    for (int reg = 0; reg < 4; reg++) {
      int n = n0 + g + ((reg & 1) ? 8 : 0);
      int kk = k0 + 2 * t + ((reg & 2) ? 8 : 0);
      half2 v = u2h(r[reg]);
      if (n < N) {
        int r0 = perm[kk], r1 = perm[kk + 1];
        if (r0 >= 0) wt[(size_t)r0 * N + n] = __low2half(v);
        if (r1 >= 0) wt[(size_t)r1 * N + n] = __high2half(v);
      }
    }
  }
}

extern "C" __global__ void gptq_dequant_b4(const int* perm, const int4* qt, const half2* sz,
                                           half* wt, int K, int N, int Np, int Kp, int gs,
                                           int G) {
  gptq_dequant_impl<4>(perm, qt, sz, wt, K, N, Np, Kp, gs, G);
}
extern "C" __global__ void gptq_dequant_b8(const int* perm, const int4* qt, const half2* sz,
                                           half* wt, int K, int N, int Np, int Kp, int gs,
                                           int G) {
  gptq_dequant_impl<8>(perm, qt, sz, wt, K, N, Np, Kp, gs, G);
}
