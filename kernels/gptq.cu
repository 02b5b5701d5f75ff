// GPTQ matrix products on f16 tensor cores (mma.sync m16n8k16, f32 accumulate).
//
// Weights are repacked once at load (src/quant/tiled.rs) into a tile layout:
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
// The activation x [M, K] (original column order) is first copied through
// `perm` (sorted position -> original column, -1 for padding) into xp
// [Mp, Kp] by gptq_permute_x. The reduction order is described at
// gptq_gemm_impl.
#include <cuda_fp16.h>
#include <stdint.h>

#include "gptq.cuh"
#include "mma.cuh"

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

// The product kernel. A block is 8 warps over C tiles of 16 output columns
// (blockIdx.x) and one of `splits` ranges of K (blockIdx.y); warp w takes
// the `kw` sorted positions [(8y + w) kw, +kw) and streams them chunk by
// chunk (one int4 per lane per column tile: 64 k at 4-bit, 32 k at 8-bit),
// keeping 4 int4 loads (and their group parameters) in flight. Tokens
// come in slabs of MT*8 (blockIdx.z); activation rows past M are not read.
//
// The activation: STAGE 0 reads xp [Mp, Kp] from gptq_permute_x (sorted
// order, rows padded) in the stream loop. STAGE 1 (up to 8 tokens: one
// launch, no permute kernel) first gathers the block's K range of x [M, K]
// (original column order) through `perm` into shared memory, rows padded by
// 8 halves against bank conflicts, while the first weight loads are in
// flight.
//
// Reduction order of every output element, for given (kw, splits), which
// depend on the layer's shape only (src/cuda/gptq.rs): the k tiles of a
// warp's range in order (in the mma accumulator), then the 8 warps of a
// block in order, then the `splits` blocks along K in order. With more than
// one, each block writes its f32 partial to part[split][m][n] and the last
// block of a (column, slab) tile to arrive (counted in `counters`, which it
// resets to zero for the next launch) sums them in split order. So the
// result is deterministic, and a row of x gives the same output at any M,
// whatever C, MT or STAGE the launch used.
#define GEMM_WARPS 8

template <int BITS, int MT, int C, int STAGE>
__device__ void gptq_gemm_impl(const half* __restrict__ xp, const int* __restrict__ perm,
                               const int4* __restrict__ qt, const half2* __restrict__ sz,
                               float* __restrict__ part, unsigned* __restrict__ counters,
                               half* __restrict__ out, int M, int K, int N, int Np, int Kp,
                               int gs, int G, int kw, int splits) {
  constexpr int KPL = BITS == 4 ? 64 : 32;  // k per int4 load
  constexpr int TPL = KPL / 16;             // 16-k tiles per load
  constexpr int DEPTH = 4;                  // int4 weight loads in flight per lane
  constexpr int AHEAD = DEPTH / C;          // chunks in flight
  constexpr int PER = C * MT * 4 * 32;      // outputs of a block (padded tile)
  __shared__ float red[GEMM_WARPS * PER];
  __shared__ bool last;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int kb = (blockIdx.y * GEMM_WARPS + warp) * kw;
  const int nch = max(0, min(kw, Kp - kb)) / KPL;  // chunks of this warp
  const int nt0 = blockIdx.x * C;
  const int mbase = blockIdx.z * MT * 8;
  const int KQ = Kp / KPL;
  auto group_of = [&](int k) { return min(k / gs, G - 1); };

  // In flight: the weights of AHEAD chunks and the group parameters of each
  // chunk's first group (a chunk spans a second group only for 4-bit with
  // groups of 32, whose parameters are then loaded when needed).
  int4 wbuf[AHEAD][C];
  half2 sbuf[AHEAD][C][2];  // rows g, g + 8
  auto issue = [&](int slot, int i) {
    const int k0 = kb + i * KPL;
    const int ga = group_of(k0);
#pragma unroll
    for (int c = 0; c < C; c++) {
      const int n0 = (nt0 + c) * 16;
      wbuf[slot][c] = __ldg(qt + ((size_t)(nt0 + c) * KQ + kb / KPL + i) * 32 + lane);
      sbuf[slot][c][0] = __ldg(sz + (size_t)ga * Np + n0 + g);
      sbuf[slot][c][1] = __ldg(sz + (size_t)ga * Np + n0 + g + 8);
    }
  };
#pragma unroll
  for (int a = 0; a < AHEAD; a++)
    if (a < nch) issue(a, a);

  extern __shared__ half xs[];  // STAGE: [rows][BK + 8]
  const int BK = GEMM_WARPS * kw, RS = BK + 8;
  const int kblock = blockIdx.y * BK;
  const int rows = min(MT * 8, M - mbase);
  if (STAGE == 1) {  // MT = 1, one slab: rows = M <= 8
    const int len = min(BK, Kp - kblock);
    constexpr int PP = 4096 / (GEMM_WARPS * 32);  // positions per thread (BK <= 4096)
    int src[PP];
#pragma unroll
    for (int u = 0; u < PP; u++) {
      const int p = threadIdx.x + u * GEMM_WARPS * 32;
      src[u] = p < len ? __ldg(perm + kblock + p) : -1;
    }
    for (int m = 0; m < rows; m++) {
      const half* row = xp + (size_t)m * K;
      half v[PP];
#pragma unroll
      for (int u = 0; u < PP; u++) v[u] = src[u] >= 0 ? __ldg(row + src[u]) : __float2half(0.f);
#pragma unroll
      for (int u = 0; u < PP; u++) {
        const int p = threadIdx.x + u * GEMM_WARPS * 32;
        if (p < len) xs[m * RS + p] = v[u];
      }
    }
    __syncthreads();
  }

  float acc[C][MT][4];
  zero_acc(acc);

  for (int i0 = 0; i0 < nch; i0 += AHEAD) {
#pragma unroll
    for (int a = 0; a < AHEAD; a++) {
      const int i = i0 + a;
      if (i >= nch) break;  // uniform over the warp
      int4 w4[C];
      half2 s4[C][2];
#pragma unroll
      for (int c = 0; c < C; c++) {
        w4[c] = wbuf[a][c];
        s4[c][0] = sbuf[a][c][0];
        s4[c][1] = sbuf[a][c][1];
      }
      if (i + AHEAD < nch) issue(a, i + AHEAD);
      const int k0 = kb + i * KPL;
      const int ga = group_of(k0);
#pragma unroll
      for (int jt = 0; jt < TPL; jt++) {
        const int kk = k0 + jt * 16;
        uint32_t b[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
          const int tok = mbase + mt * 8 + g;
          if (STAGE) {
            const half* row = xs + (tok - mbase) * RS + (kk - kblock) + 2 * t;
            b[mt][0] = tok < M ? *reinterpret_cast<const unsigned int*>(row) : 0u;
            b[mt][1] = tok < M ? *reinterpret_cast<const unsigned int*>(row + 8) : 0u;
          } else if (tok < M) {
            const half* row = xp + (size_t)tok * Kp + kk + 2 * t;
            b[mt][0] = __ldg(reinterpret_cast<const unsigned int*>(row));
            b[mt][1] = __ldg(reinterpret_cast<const unsigned int*>(row + 8));
          } else {
            b[mt][0] = 0u;
            b[mt][1] = 0u;
          }
        }
        const int grp = group_of(kk);
#pragma unroll
        for (int c = 0; c < C; c++) {
          half2 lo, hi;  // (scale, 1024 + zero) of rows g and g + 8
          if (grp == ga) {
            lo = s4[c][0];
            hi = s4[c][1];
          } else {
            const int n0 = (nt0 + c) * 16;
            lo = __ldg(sz + (size_t)grp * Np + n0 + g);
            hi = __ldg(sz + (size_t)grp * Np + n0 + g + 8);
          }
          const uint32_t w[4] = {(uint32_t)w4[c].x, (uint32_t)w4[c].y, (uint32_t)w4[c].z,
                                 (uint32_t)w4[c].w};
          uint32_t af[4];
          dequant_tile<BITS>(BITS == 4 ? &w[jt] : &w[2 * jt], __low2half2(lo), __high2half2(lo),
                             __low2half2(hi), __high2half2(hi), af);
#pragma unroll
          for (int mt = 0; mt < MT; mt++) mma_16816(acc[c][mt], af, b[mt][0], b[mt][1]);
        }
      }
    }
  }

  // The 8 warps' sums, in warp order. red[w * PER + e], e = (c, mt, r, lane).
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
  constexpr int EPT = (PER + GEMM_WARPS * 32 - 1) / (GEMM_WARPS * 32);  // elements per thread
  float sum[EPT];
#pragma unroll
  for (int i = 0; i < EPT; i++) {
    const int e = threadIdx.x + i * GEMM_WARPS * 32;
    float s = 0.f;
    if (e < PER) {
#pragma unroll
      for (int w = 0; w < GEMM_WARPS; w++) s += red[w * PER + e];
    }
    sum[i] = s;
  }
  if (splits == 1) {
#pragma unroll
    for (int i = 0; i < EPT; i++) {
      const int e = threadIdx.x + i * GEMM_WARPS * 32;
      int n, m;
      coord(e, n, m);
      if (e < PER && m < M && n < N) out[(size_t)m * N + n] = __float2half(sum[i]);
    }
    return;
  }
  const size_t MN = (size_t)M * N;
#pragma unroll
  for (int i = 0; i < EPT; i++) {
    const int e = threadIdx.x + i * GEMM_WARPS * 32;
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
  for (int i = 0; i < EPT; i++) {
    const int e = threadIdx.x + i * GEMM_WARPS * 32;
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

#define GPTQ_GEMM(BITS, MT, C, STAGE)                                                         \
  extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32, 2)                             \
      gptq_gemm_b##BITS##_m##MT##_c##C##_s##STAGE(                                             \
          const half* xp, const int* perm, const int4* qt, const half2* sz, float* part,        \
          unsigned* counters, half* out, int M, int K, int N, int Np, int Kp, int gs, int G,   \
          int kw, int splits) {                                                                \
    gptq_gemm_impl<BITS, MT, C, STAGE>(xp, perm, qt, sz, part, counters, out, M, K, N, Np, Kp, \
                                       gs, G, kw, splits);                                     \
  }
#define GPTQ_GEMM_C(BITS, MT, STAGE) \
  GPTQ_GEMM(BITS, MT, 1, STAGE)      \
  GPTQ_GEMM(BITS, MT, 2, STAGE)      \
  GPTQ_GEMM(BITS, MT, 4, STAGE)
GPTQ_GEMM_C(4, 1, 0)
GPTQ_GEMM_C(4, 1, 1)
GPTQ_GEMM_C(4, 2, 0)
GPTQ_GEMM_C(8, 1, 0)
GPTQ_GEMM_C(8, 1, 1)
GPTQ_GEMM_C(8, 2, 0)

// The large-M product (not yet used by the engine: `runner bench
// --kernels` and a GPU test only). A block computes 128 output columns x
// 128 tokens over the whole sorted K, in chunks of 64 positions in order,
// so an output's sum order depends on neither M nor the grid. 8 warps:
// warp w takes the column tiles 2 (w & 3), +1 of the block (32 columns)
// and tokens 64 (w >> 2) .. +64 (eight m8 tiles). Weights go from global
// straight to registers a chunk ahead (a lane's int4 is its A fragment for
// 64 k at 4-bit, 32 k at 8-bit); the permuted activation xp [M, Kp] (from
// gptq_permute_x) streams through two shared-memory stages with cp.async,
// rows of 64 + 8 halves (conflict-free ldmatrix), and each B fragment feeds
// both column tiles. Dequantization is dequant_tile's, f32 accumulation.
#define TL_BM 128
#define TL_BK 64
#define TL_RS (TL_BK + 8)

template <int BITS>
__device__ void gptq_tiled_impl(const half* __restrict__ xp, const int4* __restrict__ qt,
                                const half2* __restrict__ sz, half* __restrict__ out, int M,
                                int N, int Np, int Kp, int gs, int G) {
  constexpr int KPL = BITS == 4 ? 64 : 32;  // k per int4
  constexpr int LPC = TL_BK / KPL;          // int4 per column tile and chunk
  constexpr int TPL = KPL / 16;             // k16 tiles per int4
  __shared__ __align__(16) half xs[2][TL_BM * TL_RS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wn = warp & 3, wm = warp >> 2;
  const int nt0 = blockIdx.x * 8 + wn * 2;  // the warp's first 16-column tile
  const int ntiles = Np / 16;
  const int m0 = blockIdx.y * TL_BM;
  const int KQ = Kp / KPL, nchunks = Kp / TL_BK;

  auto load_x = [&](int c, int st) {
#pragma unroll
    for (int i = 0; i < TL_BM * (TL_BK / 8) / 256; i++) {
      const int idx = threadIdx.x + i * 256;
      const int r = idx >> 3, cc = (idx & 7) * 8;
      const bool ok = m0 + r < M;
      cp_async16(&xs[st][r * TL_RS + cc],
                    xp + (size_t)(ok ? m0 + r : 0) * Kp + (size_t)c * TL_BK + cc, ok);
    }
  };
  auto load_w = [&](int c, int4 (&w)[2][LPC]) {
#pragma unroll
    for (int ct = 0; ct < 2; ct++)
#pragma unroll
      for (int l = 0; l < LPC; l++)
        w[ct][l] = nt0 + ct < ntiles
                       ? __ldg(qt + ((size_t)(nt0 + ct) * KQ + c * LPC + l) * 32 + lane)
                       : make_int4(0, 0, 0, 0);
  };

  float acc[2][8][4];
  zero_acc(acc);
  int4 wcur[2][LPC], wnext[2][LPC];
  load_x(0, 0);
  cp_async_commit();
  load_w(0, wcur);
  for (int c = 0; c < nchunks; c++) {
    const int st = c & 1;
    if (c + 1 < nchunks) {
      load_x(c + 1, st ^ 1);
      cp_async_commit();
      load_w(c + 1, wnext);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < TL_BK / 16; kk++) {
      const int grp = min((c * TL_BK + kk * 16) / gs, G - 1);
      // B fragments of the warp's 8 m8 tiles: x4 = two tiles (rows tok,
      // tok + 8) x (k, k + 8).
      uint32_t b[8][2];
#pragma unroll
      for (int mp = 0; mp < 4; mp++) {
        const int row = wm * 64 + mp * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        uint32_t r4[4];
        ldsm_x4(r4, &xs[st][row * TL_RS + col]);
        b[2 * mp][0] = r4[0];
        b[2 * mp][1] = r4[1];
        b[2 * mp + 1][0] = r4[2];
        b[2 * mp + 1][1] = r4[3];
      }
#pragma unroll
      for (int ct = 0; ct < 2; ct++) {
        const int n0 = (nt0 + ct) * 16;
        if (nt0 + ct >= ntiles) continue;  // uniform over the warp
        const half2 lo = __ldg(sz + (size_t)grp * Np + n0 + g);
        const half2 hi = __ldg(sz + (size_t)grp * Np + n0 + g + 8);
        const int4 w4 = wcur[ct][kk / TPL];
        const uint32_t w[4] = {(uint32_t)w4.x, (uint32_t)w4.y, (uint32_t)w4.z, (uint32_t)w4.w};
        const int jt = kk % TPL;
        uint32_t af[4];
        dequant_tile<BITS>(BITS == 4 ? &w[jt] : &w[2 * jt], __low2half2(lo), __high2half2(lo),
                           __low2half2(hi), __high2half2(hi), af);
#pragma unroll
        for (int mt = 0; mt < 8; mt++) mma_16816(acc[ct][mt], af, b[mt][0], b[mt][1]);
      }
    }
    __syncthreads();  // the next load overwrites this stage
    if (c + 1 < nchunks) {
#pragma unroll
      for (int ct = 0; ct < 2; ct++)
#pragma unroll
        for (int l = 0; l < LPC; l++) wcur[ct][l] = wnext[ct][l];
    }
  }
  // C fragment: rows are columns n, columns are tokens.
#pragma unroll
  for (int ct = 0; ct < 2; ct++)
#pragma unroll
    for (int mt = 0; mt < 8; mt++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const int n = (nt0 + ct) * 16 + g + ((r & 2) ? 8 : 0);
        const int m = m0 + wm * 64 + mt * 8 + 2 * t + (r & 1);
        if (m < M && n < N) out[(size_t)m * N + n] = __float2half(acc[ct][mt][r]);
      }
}

extern "C" __global__ void __launch_bounds__(256, 2)
    gptq_tiled_b4(const half* xp, const int4* qt, const half2* sz, half* out, int M, int N, int Np,
                  int Kp, int gs, int G) {
  gptq_tiled_impl<4>(xp, qt, sz, out, M, N, Np, Kp, gs, G);
}
extern "C" __global__ void __launch_bounds__(256, 2)
    gptq_tiled_b8(const half* xp, const int4* qt, const half2* sz, half* out, int M, int N, int Np,
                  int Kp, int gs, int G) {
  gptq_tiled_impl<8>(xp, qt, sz, out, M, N, Np, Kp, gs, G);
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
