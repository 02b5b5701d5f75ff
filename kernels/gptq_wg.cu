// The large-M GPTQ product on Hopper (sm_90a): warpgroup tensor-core
// products (wgmma) over the packed weights, dequantized in the main loop.
//
// out [M, N] = xp [M, Kp] W^T, xp the activation in sorted-K order (from
// gptq_permute_x in gptq.cu), W in the tile layout of gptq.cu. The product is
// computed transposed, out^T = W xp^T: the weights are wgmma's A operand,
// which may come from registers, so a warp dequantizes its 16 x 16 tile
// straight into the A fragment (dequant_tile: the tile layout's fragment is
// wgmma's register layout); the tokens are wgmma's N, read from shared
// memory through a matrix descriptor.
//
// A block is two warpgroups over BN = 128 NW output columns (64 NW each:
// warp w of warpgroup wg dequantizes the 16-column tiles 4 (NW wg + u) + w,
// u < NW, one per m64 product) and BM tokens (blockIdx.y), over the sorted
// range of `kc` chunks of 64 positions (blockIdx.z: the K split). Each chunk's stage holds the token tile
// [BM][64] f16 in the 128-byte swizzled layout wgmma reads (16-byte piece p
// of row r at p ^ (r & 7)), the block's weight words and the (scale, 1024 +
// zero) pairs of each 16-position step's group; S stages stream through
// cp.async, S - 2 chunks ahead. Per chunk a warpgroup issues its m64nBMk16
// products as one group and dequantizes the next chunk while they run (the
// A fragments double-buffered by chunk).
//
// Reduction order of an output: its split's chunks in order, 16 positions
// per product in the tensor core's order, accumulated in f32; with splits,
// the partials part[z][m][n] are summed in split order by gptq_wg_reduce.
// By construction it depends on the split count, not on M or on the row's
// position in the batch. That the block shape (the wgmma's N, two products
// per warpgroup, blocks per multiprocessor) does not change it either is the
// tensor cores' observed behaviour, not a documented one: the GPU test
// gptq::fused_gptq_rows_do_not_depend_on_the_batch pins it (H200).
#include <cuda_fp16.h>
#include <stdint.h>

#include "gptq.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

#define WG_THREADS 256
#define WG_BK 64  // sorted positions per chunk (one 128-byte swizzle row)

template <int BITS, int BM, int NW>
struct WgShape {
  static constexpr int BN = 128 * NW;              // output columns per block
  static constexpr int TILES = BN / 16;            // 16-column tiles per block
  static constexpr int KPL = BITS == 4 ? 64 : 32;  // k per int4 of a lane
  static constexpr int LPC = WG_BK / KPL;          // int4 per lane, tile and chunk
  static constexpr int XB = BM * WG_BK * 2;        // token tile bytes (multiple of 1024)
  static constexpr int WB = TILES * LPC * 32 * 16;
  static constexpr int SB = 4 * BN * 4;  // 4 steps x BN columns x half2
  static constexpr int STAGE = XB + WB + SB;
  static constexpr int ER = BN + 4;  // epilogue row (f32), conflict-free
};

// Shared-memory matrix descriptor: K-major rows of 128 bytes, 128-byte
// swizzle, 8-row groups 1,024 bytes apart.
__device__ __forceinline__ uint64_t wg_desc(const void* p) {
  const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
  return (uint64_t)((a & 0x3ffff) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
         ((uint64_t)1 << 62);
}

template <int BM>
__device__ __forceinline__ void wg_mma(float (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BM == 64) wg_m64n64k16(d, a, desc);
  if constexpr (BM == 128) wg_m64n128k16(d, a, desc);
  if constexpr (BM == 256) wg_m64n256k16(d, a, desc);
}

template <int BITS, int BM, int NW, int S>
__device__ void gptq_wg_impl(const half* __restrict__ xp, const int4* __restrict__ qt,
                             const half2* __restrict__ sz, half* __restrict__ out,
                             float* __restrict__ part, int M, int N, int Np, int Kp, int gs,
                             int G, int kc) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sh = WgShape<BITS, BM, NW>;
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms must sit on 1,024-byte boundaries.
  const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw & 1023)) & 1023);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const int nt0 = blockIdx.x * Sh::TILES;
  const int ntiles = Np / 16;
  const int m0 = blockIdx.y * BM;
  const int KQ = Kp / Sh::KPL;
  const int c0 = blockIdx.z * kc;
  const int nch = max(0, min(Kp / WG_BK - c0, kc));
  // The warp's tile of product u: 4 (NW wg + u) + wq. Np is a multiple of
  // 64, so an m64 product's four tiles all exist or none do; a warpgroup
  // with none skips its products (past-the-end tiles load as zeros).
  const bool active = nt0 + 4 * NW * wg < ntiles;

  // Each thread's share of a stage, fixed per thread (compile-time trip
  // counts, so that a chunk's loads are a few address adds): token rows
  // r0 + 32 it (16-byte piece p, swizzled by r & 7 = r0 & 7), weight words
  // tid + 256 it, and for tid < BN one piece of the group parameters.
  const int r0 = tid >> 3, p = tid & 7;
  const int xoff = r0 * 128 + ((p ^ (r0 & 7)) << 4);
  auto load = [&](int c, int st) {
    uint8_t* base = smem + st * Sh::STAGE;
    const int k0 = (c0 + c) * WG_BK;
#pragma unroll
    for (int it = 0; it < BM * 8 / WG_THREADS; it++) {
      const int r = r0 + 32 * it;
      const bool ok = m0 + r < M;
      cp_async16(base + xoff + it * 4096, xp + (size_t)(ok ? m0 + r : 0) * Kp + k0 + p * 8, ok);
    }
    int4* ws = reinterpret_cast<int4*>(base + Sh::XB);
#pragma unroll
    for (int it = 0; it < Sh::TILES * Sh::LPC * 32 / WG_THREADS; it++) {
      const int i = tid + it * WG_THREADS;
      const int tl = i / (Sh::LPC * 32), l = (i >> 5) % Sh::LPC, ln = i & 31;
      const bool ok = nt0 + tl < ntiles;
      cp_async16(ws + i, qt + ((size_t)(ok ? nt0 + tl : 0) * KQ + k0 / Sh::KPL + l) * 32 + ln, ok);
    }
    if (tid < Sh::BN) {  // 4 steps x BN / 4 pieces of 16 bytes
      half2* ss = reinterpret_cast<half2*>(base + Sh::XB + Sh::WB);
      const int j = tid / (Sh::BN / 4), q = tid % (Sh::BN / 4);
      const int grp = min((k0 + 16 * j) / gs, G - 1);
      const int col = nt0 * 16 + 4 * q;
      const bool ok = col < Np;
      cp_async16(ss + j * Sh::BN + 4 * q, sz + (size_t)grp * Np + (ok ? col : 0), ok);
    }
  };

  float acc[NW][BM / 2];
#pragma unroll
  for (int u = 0; u < NW; u++)
#pragma unroll
    for (int i = 0; i < BM / 2; i++) acc[u][i] = 0.f;

  // A chunk's A fragments (per product u and 16-position step j),
  // dequantized from its stage while the previous chunk's products run.
  auto dequant = [&](int st, uint32_t (&af)[NW][4][4]) {
    const uint8_t* base = smem + st * Sh::STAGE;
    const int4* ws = reinterpret_cast<const int4*>(base + Sh::XB);
    const half2* ss = reinterpret_cast<const half2*>(base + Sh::XB + Sh::WB);
#pragma unroll
    for (int u = 0; u < NW; u++) {
      const int tile = 4 * (NW * wg + u) + wq;
      uint32_t w[4 * Sh::LPC];
#pragma unroll
      for (int l = 0; l < Sh::LPC; l++) {
        const int4 v = ws[(tile * Sh::LPC + l) * 32 + lane];
        w[4 * l] = v.x;
        w[4 * l + 1] = v.y;
        w[4 * l + 2] = v.z;
        w[4 * l + 3] = v.w;
      }
#pragma unroll
      for (int j = 0; j < 4; j++) {
        const half2 lo = ss[j * Sh::BN + tile * 16 + g];
        const half2 hi = ss[j * Sh::BN + tile * 16 + g + 8];
        dequant_tile<BITS>(BITS == 4 ? &w[j] : &w[2 * j], __low2half2(lo), __high2half2(lo),
                           __low2half2(hi), __high2half2(hi), af[u][j]);
      }
    }
  };
  // The chunk's products, one wgmma group.
  auto issue = [&](int st, const uint32_t (&af)[NW][4][4]) {
    const uint64_t desc = wg_desc(smem + st * Sh::STAGE);
    wg_fence();
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int u = 0; u < NW; u++) {
        // Step j's 16 positions start 32 bytes into each swizzled row.
        wg_mma<BM>(acc[u], af[u][j], desc + (uint64_t)(2 * j));
      }
    wg_commit();
  };
  // cp.async writes through the generic proxy, wgmma reads through the
  // async one.
  auto ready = [&]() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
  };

  // Chunks 0 .. S - 3 in flight before the first product. Step i issues
  // chunk i's products, then loads chunk i + S - 2 into the stage of chunk
  // i - 2 (every warpgroup waited for those products in step i - 1, before
  // its barrier), then dequantizes chunk i + 1 while chunk i's products
  // run: only the dequantization lies between a barrier and the next issue.
#pragma unroll
  for (int s = 0; s < S - 2; s++) {
    if (s < nch) load(s, s);
    cp_async_commit();
  }
  // Two named fragment sets (a runtime index would put them in local memory).
  uint32_t af0[NW][4][4], af1[NW][4][4];
  int st = 0;  // the stage of chunk i
  auto step = [&](int i, const uint32_t (&cur)[NW][4][4], uint32_t (&next)[NW][4][4]) {
    if (active) issue(st, cur);
    const int ahead = st + S - 2 >= S ? st - 2 : st + S - 2;  // (i + S - 2) % S
    if (i + S - 2 < nch) load(i + S - 2, ahead);
    cp_async_commit();
    if (active) wg_wait<1>();  // chunk i - 1's products are done, chunk i's run
    cp_async_wait<S - 3>();    // chunk i + 1 has landed
    ready();
    st = st + 1 == S ? 0 : st + 1;
    if (active && i + 1 < nch) dequant(st, next);
  };
  cp_async_wait<S - 3>();
  ready();
  if (active && nch > 0) dequant(0, af0);
  for (int i = 0; i < nch; i += 2) {
    step(i, af0, af1);
    if (i + 1 < nch) step(i + 1, af1, af0);
  }
  wg_wait<0>();
#pragma unroll
  for (int u = 0; u < NW; u++)
#pragma unroll
    for (int i = 0; i < BM / 2; i++) wg_keep(acc[u][i]);
  cp_async_wait<0>();
  __syncthreads();

  // Through shared memory, so that rows go out in 16-byte pieces.
  float* es = reinterpret_cast<float*>(smem);
  if (active) {
#pragma unroll
    for (int u = 0; u < NW; u++)
#pragma unroll
      for (int i = 0; i < BM / 2; i++) {
        const int col = (4 * (NW * wg + u) + wq) * 16 + g + 8 * ((i >> 1) & 1);
        const int row = 8 * (i >> 2) + 2 * t + (i & 1);
        es[row * Sh::ER + col] = acc[u][i];
      }
  }
  __syncthreads();
  const int rows = min(BM, M - m0);
  const int n0 = nt0 * 16;
  for (int i = tid; i < rows * (Sh::BN / 8); i += WG_THREADS) {
    const int r = i / (Sh::BN / 8), c = (i % (Sh::BN / 8)) * 8;
    const int n = n0 + c;
    if (n >= N) continue;
    const float* src = es + r * Sh::ER + c;
    const size_t o = (size_t)(m0 + r) * N + n;
    if (part != nullptr) {
      float* dst = part + (size_t)blockIdx.z * M * N + o;
      for (int e = 0; e < 8 && n + e < N; e++) dst[e] = src[e];
    } else if (n + 8 <= N && (N & 7) == 0) {
      half h[8];
#pragma unroll
      for (int e = 0; e < 8; e++) h[e] = __float2half(src[e]);
      *reinterpret_cast<int4*>(out + o) = *reinterpret_cast<const int4*>(h);
    } else {
      for (int e = 0; e < 8 && n + e < N; e++) out[o + e] = __float2half(src[e]);
    }
  }
#endif
}

// Stages per build: as many as fit in the 227 KiB a block may have, or, for
// two resident blocks per multiprocessor (OCC 2: more warps to hide the
// dequantization's latency, at most 128 registers a thread), in ~110 KiB
// (src/backend/cuda/gptq/wg.rs sizes the launch's shared memory to match).
#define GPTQ_WG(BITS, BM, NW, S, OCC)                                                  \
  extern "C" __global__ void __launch_bounds__(WG_THREADS, OCC)                        \
      gptq_wg_b##BITS##_n##BM##_w##NW##_o##OCC(const half* xp, const int4* qt,          \
                                               const half2* sz, half* out, float* part, \
                                               int M, int N, int Np, int Kp, int gs,    \
                                               int G, int kc) {                         \
    gptq_wg_impl<BITS, BM, NW, S>(xp, qt, sz, out, part, M, N, Np, Kp, gs, G, kc);     \
  }
GPTQ_WG(4, 64, 1, 8, 1)
GPTQ_WG(4, 128, 1, 8, 1)
GPTQ_WG(4, 256, 1, 5, 1)
GPTQ_WG(4, 64, 2, 8, 1)
GPTQ_WG(4, 128, 2, 7, 1)
GPTQ_WG(4, 64, 1, 6, 2)
GPTQ_WG(4, 128, 1, 4, 2)
GPTQ_WG(8, 64, 1, 8, 1)
GPTQ_WG(8, 128, 1, 8, 1)
GPTQ_WG(8, 256, 1, 5, 1)
GPTQ_WG(8, 64, 2, 8, 1)
GPTQ_WG(8, 128, 2, 6, 1)
GPTQ_WG(8, 64, 1, 5, 2)
GPTQ_WG(8, 128, 1, 4, 2)

// out[i] = the splits' partials of element i summed in split order.
extern "C" __global__ void gptq_wg_reduce(const float* __restrict__ part, half* __restrict__ out,
                                          long long mn, int splits) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= mn) return;
  float s = 0.f;
  for (int z = 0; z < splits; z++) s += part[z * mn + i];
  out[i] = __float2half(s);
}
