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
// The activation x [M, K] (original column order) is read through `perm`
// (sorted position -> original column, -1 for padding): gathered inside the
// product kernel for small M, or first copied into xp [Mp, Kp] by
// gptq_permute_x. The reduction order is described at gptq_gemm_impl.
#include <cuda_fp16.h>
#include <stdint.h>

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

// The product kernel. One block = 8 warps over a block-column of 16*C
// output columns (C tiles of 16) and a K range of 8*KS sorted positions
// (blockIdx.y); warp w takes the KS positions [(8y + w) KS, +KS) for all C
// tiles, so each activation fragment feeds C mmas and each lane issues all
// its 2C int4 weight loads before the first mma. Tokens come in slabs of
// MT*8 (blockIdx.z).
//
// GATHER: x is [M, K] in original column order, gathered through `perm`
// (sorted position -> original column, -1 for padding) while the fragments
// are built (small M: saves the permute launch). Otherwise x is xp [Mp, Kp]
// from gptq_permute_x.
//
// Reduction order of every output element, whatever M, MT, C or GATHER:
// the k tiles of a warp's range in order (in the mma accumulator), then the
// 8 warps of a block in order, then the blocks along K in order. With more
// than one block along K, each block writes its f32 partial to
// part[split][m][n]; the last block of a (column, slab) tile to arrive
// (counted in `counters`, which it resets to zero for the next launch)
// sums the partials in split order and writes f16. So the result is
// deterministic and the same row of x gives the same output at any M.
#define GEMM_WARPS 8

template <int BITS>
struct GemmConst {
  static constexpr int KPL = BITS == 4 ? 64 : 32;  // k per int4 load
  static constexpr int TPL = KPL / 16;             // 16-k tiles per load
  static constexpr int KS = 2 * KPL;               // sorted positions per warp
  static constexpr int KT = KS / 16;               // k tiles per warp
};

template <int BITS, int MT, int C, bool GATHER>
__device__ void gptq_gemm_impl(const half* __restrict__ x, const int* __restrict__ perm,
                               const int4* __restrict__ qt, const half2* __restrict__ sz,
                               float* __restrict__ part, unsigned* __restrict__ counters,
                               half* __restrict__ out, int M, int K, int N, int Np, int Kp,
                               int gs, int G, int splits) {
  using GC = GemmConst<BITS>;
  constexpr int KS = GC::KS, KT = GC::KT, KPL = GC::KPL, TPL = GC::TPL;
  constexpr int BK = GEMM_WARPS * KS;  // sorted positions per block
  constexpr int LPC = KS / KPL;        // int4 loads per column tile per warp
  constexpr int VALS = C * MT * 4;     // accumulators per lane
  constexpr int PER = VALS * 32;       // outputs of a block (padded tile)
  __shared__ int perm_s[GATHER ? BK : 1];
  __shared__ float red[GEMM_WARPS * PER];
  __shared__ bool last;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int kblock = blockIdx.y * BK;
  const int kb = kblock + warp * KS;  // this warp's first sorted position
  const int nt0 = blockIdx.x * C;     // first 16-column tile
  const int mbase = blockIdx.z * MT * 8;
  const int KQ = Kp / KPL;

  // 1. Every weight load of this warp, in flight at once.
  int4 wq[C][LPC];
#pragma unroll
  for (int c = 0; c < C; c++)
#pragma unroll
    for (int l = 0; l < LPC; l++)
      wq[c][l] = kb + l * KPL < Kp
                     ? __ldg(qt + ((size_t)(nt0 + c) * KQ + kb / KPL + l) * 32 + lane)
                     : make_int4(0, 0, 0, 0);

  // 2. The group parameters of the range's first group.
  int cur = min(min(kb, Kp - 1) / gs, G - 1);
  half2 s0[C], z0[C], s1[C], z1[C];
#pragma unroll
  for (int c = 0; c < C; c++) {
    const int n0 = (nt0 + c) * 16;
    half2 a = __ldg(sz + (size_t)cur * Np + n0 + g);
    half2 b = __ldg(sz + (size_t)cur * Np + n0 + g + 8);
    s0[c] = __low2half2(a);
    z0[c] = __high2half2(a);
    s1[c] = __low2half2(b);
    z1[c] = __high2half2(b);
  }

  if (GATHER) {
    for (int i = threadIdx.x; i < BK; i += blockDim.x)
      perm_s[i] = kblock + i < Kp ? perm[kblock + i] : -1;
    __syncthreads();
  }

  float acc[C][MT][4];
#pragma unroll
  for (int c = 0; c < C; c++)
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int r = 0; r < 4; r++) acc[c][mt][r] = 0.f;

#pragma unroll
  for (int j = 0; j < KT; j++) {
    const int k0 = kb + j * 16;
    if (k0 >= Kp) break;  // uniform over the warp
    // Activation fragments: b0 = x[tok g][k0+2t, +1], b1 = the same at k0+8.
    uint32_t b[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
      const int tok = mbase + mt * 8 + g;
      if (GATHER) {
        const int kl = k0 - kblock + 2 * t;
        half v[4] = {__float2half(0.f), __float2half(0.f), __float2half(0.f),
                     __float2half(0.f)};
        if (tok < M) {
          const half* row = x + (size_t)tok * K;
          const int p[4] = {perm_s[kl], perm_s[kl + 1], perm_s[kl + 8], perm_s[kl + 9]};
#pragma unroll
          for (int i = 0; i < 4; i++)
            if (p[i] >= 0) v[i] = __ldg(row + p[i]);
        }
        b[mt][0] = h2u(__halves2half2(v[0], v[1]));
        b[mt][1] = h2u(__halves2half2(v[2], v[3]));
      } else {
        const half* row = x + (size_t)tok * Kp + k0 + 2 * t;
        b[mt][0] = __ldg(reinterpret_cast<const unsigned int*>(row));
        b[mt][1] = __ldg(reinterpret_cast<const unsigned int*>(row + 8));
      }
    }
    const int grp = min(k0 / gs, G - 1);
    if (grp != cur) {  // uniform over the warp
      cur = grp;
#pragma unroll
      for (int c = 0; c < C; c++) {
        const int n0 = (nt0 + c) * 16;
        half2 a = __ldg(sz + (size_t)grp * Np + n0 + g);
        half2 bb = __ldg(sz + (size_t)grp * Np + n0 + g + 8);
        s0[c] = __low2half2(a);
        z0[c] = __high2half2(a);
        s1[c] = __low2half2(bb);
        z1[c] = __high2half2(bb);
      }
    }
    const int l = j / TPL, jt = j % TPL;
#pragma unroll
    for (int c = 0; c < C; c++) {
      const uint32_t w[4] = {(uint32_t)wq[c][l].x, (uint32_t)wq[c][l].y,
                             (uint32_t)wq[c][l].z, (uint32_t)wq[c][l].w};
      uint32_t a[4];
      dequant_tile<BITS>(BITS == 4 ? &w[jt] : &w[2 * jt], s0[c], z0[c], s1[c], z1[c], a);
#pragma unroll
      for (int mt = 0; mt < MT; mt++) mma_16816(acc[c][mt], a, b[mt][0], b[mt][1]);
    }
  }

  // 3. The 8 warps' sums, in warp order. red[w * PER + e], e = (c, mt, r, lane).
#pragma unroll
  for (int c = 0; c < C; c++)
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
      for (int r = 0; r < 4; r++)
        red[warp * PER + ((c * MT + mt) * 4 + r) * 32 + lane] = acc[c][mt][r];
  __syncthreads();
  // Element e -> (column n, token m) of the C fragment (rows = columns n).
  auto coord = [&](int e, int& n, int& m) {
    const int ln = e & 31, r = (e >> 5) & 3, mt = (e >> 7) % MT, c = (e >> 7) / MT;
    n = (nt0 + c) * 16 + (ln >> 2) + ((r & 2) ? 8 : 0);
    m = mbase + mt * 8 + 2 * (ln & 3) + (r & 1);
  };
  float sum[(PER + 255) / 256];
#pragma unroll
  for (int i = 0; i < (PER + 255) / 256; i++) {
    const int e = threadIdx.x + i * 256;
    float s = 0.f;
    if (e < PER) {
#pragma unroll
      for (int w = 0; w < GEMM_WARPS; w++) s += red[w * PER + e];
    }
    sum[i] = s;
  }
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < (PER + 255) / 256; i++) {
      const int e = threadIdx.x + i * 256;
      int n, m;
      coord(e, n, m);
      if (e < PER && m < M && n < N) out[(size_t)m * N + n] = __float2half(sum[i]);
    }
    return;
  }
  const size_t MN = (size_t)M * N;
#pragma unroll
  for (int i = 0; i < (PER + 255) / 256; i++) {
    const int e = threadIdx.x + i * 256;
    int n, m;
    coord(e, n, m);
    if (e < PER && m < M && n < N) part[blockIdx.y * MN + (size_t)m * N + n] = sum[i];
  }
  __threadfence();
  __syncthreads();
  unsigned* cnt = counters + blockIdx.z * gridDim.x + blockIdx.x;
  if (threadIdx.x == 0) last = atomicAdd(cnt, 1u) == (unsigned)splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
#pragma unroll
  for (int i = 0; i < (PER + 255) / 256; i++) {
    const int e = threadIdx.x + i * 256;
    int n, m;
    coord(e, n, m);
    if (e < PER && m < M && n < N) {
      float s = 0.f;
      for (int y = 0; y < splits; y++) s += __ldcg(part + y * MN + (size_t)m * N + n);
      out[(size_t)m * N + n] = __float2half(s);
    }
  }
  if (threadIdx.x == 0) *cnt = 0u;
}

#define GPTQ_GEMM(BITS, MT, C, GATHER)                                                         \
  extern "C" __global__ void __launch_bounds__(256, 2)                                        \
      gptq_gemm_b##BITS##_m##MT##_c##C##_g##GATHER(                                           \
          const half* x, const int* perm, const int4* qt, const half2* sz, float* part,        \
          unsigned* counters, half* out, int M, int K, int N, int Np, int Kp, int gs, int G,   \
          int splits) {                                                                        \
    gptq_gemm_impl<BITS, MT, C, GATHER>(x, perm, qt, sz, part, counters, out, M, K, N, Np, Kp, \
                                        gs, G, splits);                                        \
  }
#define GPTQ_GEMM_C(BITS, MT, GATHER) \
  GPTQ_GEMM(BITS, MT, 1, GATHER)      \
  GPTQ_GEMM(BITS, MT, 2, GATHER)      \
  GPTQ_GEMM(BITS, MT, 4, GATHER)
GPTQ_GEMM_C(4, 1, 0)
GPTQ_GEMM_C(4, 1, 1)
GPTQ_GEMM_C(4, 2, 0)
GPTQ_GEMM_C(4, 2, 1)
GPTQ_GEMM_C(8, 1, 0)
GPTQ_GEMM_C(8, 1, 1)
GPTQ_GEMM_C(8, 2, 0)
GPTQ_GEMM_C(8, 2, 1)

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
