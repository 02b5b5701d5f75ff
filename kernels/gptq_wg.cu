// The large-M GPTQ product on Hopper (sm_90a): warpgroup tensor-core
// products (wgmma) over the packed weights, dequantized in the main loop.
//
// out [M, N] = xp [M, Kp] W^T, xp the activation in sorted-K order (laid
// out by gptq_wg_permute_x below), W in the tile layout of gptq.cu. The product is
// computed transposed, out^T = W xp^T: the weights are wgmma's A operand,
// which may come from registers, so a warp dequantizes its 16 x 16 tile
// straight into the A fragment (dequant_tile: the tile layout's fragment is
// wgmma's register layout); the tokens are wgmma's N, read from shared
// memory through a matrix descriptor.
//
// A block is two consumer warpgroups over BN = 128 NW output columns (64 NW
// each: warp w of warpgroup wg dequantizes the 16-column tiles
// 4 (NW wg + u) + w, u < NW, one per m64 product) and BM tokens
// (blockIdx.y), over the sorted range of `kc` chunks of 64 positions
// (blockIdx.z: the K split), and one producer warp. Each chunk's stage
// holds the token tile [BM][64] f16 in the 128-byte swizzled layout wgmma
// reads (16-byte piece p of row r at p ^ (r & 7)), the block's weight words
// and the (scale, 1024 + zero) pairs of each 16-position step's group. The
// producer fills S stages by bulk copies (cp.async.bulk), the token tile in
// one copy because gptq_wg_permute_x lays the activation out chunk by chunk
// already swizzled; an mbarrier per stage counts the bytes in (full) and
// another the consumer warps done with it (empty). A consumer warpgroup
// issues a chunk's m64nBMk16 products as one group and dequantizes the
// next chunk while they run (the A fragments double-buffered by chunk): it
// issues no loads and meets the other warpgroup at no barrier.
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
#include "sm90.cuh"
#include "wgmma.cuh"

#define WG_CONSUMERS 256  // two warpgroups: dequantize and issue the products
#define WG_THREADS 384    // and a producer warpgroup, one warp of it issuing the copies
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
__device__ __forceinline__ uint64_t wg_desc(const void* p) { return wg_desc_sw128(p, 16, 1024); }

template <int BM>
__device__ __forceinline__ void wg_mma(float (&d)[BM / 2], const uint32_t (&a)[4], uint64_t desc) {
  if constexpr (BM == 64) wg_m64n64k16(d, a, desc);
  if constexpr (BM == 128) wg_m64n128k16(d, a, desc);
  if constexpr (BM == 256) wg_m64n256k16(d, a, desc);
}

// The consumer warpgroups' own barrier (the producer warp does not join).
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(WG_CONSUMERS) : "memory");
}

template <int BITS, int BM, int NW, int S>
__device__ void gptq_wg_impl(const half* __restrict__ xs, const int4* __restrict__ qt,
                             const half2* __restrict__ sz, half* __restrict__ out,
                             float* __restrict__ part, int M, int Mp, int N, int Np, int Kp,
                             int gs, int G, int kc) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sh = WgShape<BITS, BM, NW>;
  extern __shared__ uint8_t smem_raw[];
  // Swizzle atoms must sit on 1,024-byte boundaries.
  const uint32_t raw = sh(smem_raw);
  uint8_t* smem = smem_raw + ((1024 - (raw & 1023)) & 1023);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S * Sh::STAGE);
  uint64_t* empty = full + S;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2, wq = warp & 3;
  const int g = lane >> 2, t = lane & 3;
  const int nt0 = blockIdx.x * Sh::TILES;
  const int ntiles = Np / 16;
  const int m0 = blockIdx.y * BM;
  const int KQ = Kp / Sh::KPL;
  const int c0 = blockIdx.z * kc;
  const int nch = max(0, min(Kp / WG_BK - c0, kc));
  // Warpgroup wg's products cover tiles 4 NW wg .. +4 NW. Np is a multiple
  // of 64, so an m64 product's four tiles all exist or none do; warpgroup 0
  // always has one, warpgroup 1 may have none and then sits the loop out.
  const bool active = nt0 + 4 * NW * wg < ntiles;
  const int consumers = nt0 + 4 * NW < ntiles ? 8 : 4;  // warps that release a stage

  if (tid == 0) {
    for (int s = 0; s < S; s++) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], consumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // The producer warp: chunk i into stage i % S once its previous chunk's
  // products are done, as bulk copies counted on full[stage]: the token
  // tile (one contiguous, already swizzled run of xs), one run of weight
  // words per 16-column tile, one run of group parameters per 16-position
  // step.
  auto produce = [&]() {
    const int vt = min(Sh::TILES, ntiles - nt0);
    const uint32_t bytes = BM * 128 + vt * (Sh::LPC * 512 + 256);
    for (int i = 0, st = 0, ph = 0; i < nch; i++) {
      if (i >= S) mbar_wait(&empty[st], ph ^ 1);
      uint8_t* base = smem + st * Sh::STAGE;
      const int c = c0 + i, k0 = c * WG_BK;
      if (lane == 0) mbar_expect(&full[st], bytes);
      __syncwarp();
      if (lane < vt) {
        const int4* src = qt + ((size_t)(nt0 + lane) * KQ + k0 / Sh::KPL) * 32;
        bulk_load(base + Sh::XB + lane * Sh::LPC * 512, src, Sh::LPC * 512, &full[st]);
      } else if (lane >= 16 && lane < 20) {
        const int j = lane - 16;
        const int grp = min((k0 + 16 * j) / gs, G - 1);
        bulk_load(base + Sh::XB + Sh::WB + j * Sh::BN * 4, sz + (size_t)grp * Np + nt0 * 16,
                  vt * 64, &full[st]);
      } else if (lane == 31) {
        bulk_load(base, xs + ((size_t)c * Mp + m0) * WG_BK, BM * 128, &full[st]);
      }
      if (++st == S) st = 0, ph ^= 1;
    }
  };

  // Registers move from the producer warpgroup to the consumers (a
  // multiprocessor's quarter holds one warp of each warpgroup: 40 + 2 x 232
  // of its 512 registers a lane).
  if (warp >= WG_CONSUMERS / 32) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == WG_CONSUMERS / 32) produce();
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
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

  // Step i issues chunk i's products, waits for chunk i - 1's (releasing
  // its stage to the producer), then waits for chunk i + 1's stage and
  // dequantizes it while chunk i's products run.
  uint32_t af0[NW][4][4], af1[NW][4][4];  // named sets: a runtime index would spill
  int st = 0, ph = 0, prev = 0;           // stage and phase of chunk i, stage of i - 1
  auto step = [&](int i, const uint32_t (&cur)[NW][4][4], uint32_t (&next)[NW][4][4]) {
    issue(st, cur);
    wg_wait<1>();
    if (i > 0 && lane == 0) mbar_arrive(&empty[prev]);
    prev = st;
    if (++st == S) st = 0, ph ^= 1;
    if (i + 1 < nch) {
      mbar_wait(&full[st], ph);
      dequant(st, next);
    }
  };
  if (active && nch > 0) {
    mbar_wait(&full[0], 0);
    dequant(0, af0);
    for (int i = 0; i < nch; i += 2) {
      step(i, af0, af1);
      if (i + 1 < nch) step(i + 1, af1, af0);
    }
    wg_wait<0>();
#pragma unroll
    for (int u = 0; u < NW; u++)
#pragma unroll
      for (int i = 0; i < BM / 2; i++) wg_keep(acc[u][i]);
  }
  // Every chunk has landed (warpgroup 0 waited for each) and no product
  // reads a stage any more: the stages become the epilogue's rows.
  consumers_sync();

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
  consumers_sync();
  const int rows = min(BM, M - m0);
  const int n0 = nt0 * 16;
  for (int i = tid; i < rows * (Sh::BN / 8); i += WG_CONSUMERS) {
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

// Stages per build: as many as fit in the 227 KiB a block may have
// (src/backend/cuda/gptq/wg.rs sizes the launch's shared memory to match).
#define GPTQ_WG(BITS, BM, NW, S)                                                      \
  extern "C" __global__ void __launch_bounds__(WG_THREADS, 1)                         \
      gptq_wg_b##BITS##_n##BM##_w##NW(const half* xs, const int4* qt, const half2* sz, \
                                      half* out, float* part, int M, int Mp, int N,    \
                                      int Np, int Kp, int gs, int G, int kc) {         \
    gptq_wg_impl<BITS, BM, NW, S>(xs, qt, sz, out, part, M, Mp, N, Np, Kp, gs, G, kc); \
  }
GPTQ_WG(4, 64, 1, 8)
GPTQ_WG(4, 128, 1, 8)
GPTQ_WG(4, 256, 1, 5)
GPTQ_WG(4, 64, 2, 8)
GPTQ_WG(4, 128, 2, 7)
GPTQ_WG(8, 64, 1, 8)
GPTQ_WG(8, 128, 1, 8)
GPTQ_WG(8, 256, 1, 5)
GPTQ_WG(8, 64, 2, 8)
GPTQ_WG(8, 128, 2, 6)

// xs = the activation in sorted K order, laid out as the stages read it:
// chunk c of 64 positions holds Mp rows (M rounded up to the launch's token
// block) of 128 bytes, the 16-byte piece p of row r stored at p ^ (r & 7)
// (wgmma's 128-byte swizzle), zero past M and in the padding. A block's
// token tile of a chunk is then one contiguous run (its first row a
// multiple of 8). One block per row: the row is read whole into shared
// memory (K halves), then gathered through `perm` in 16-byte pieces.
extern "C" __global__ void gptq_wg_permute_x(const half* __restrict__ x,
                                             const int* __restrict__ perm, half* __restrict__ xs,
                                             int M, int K, int Mp, int Kp) {
  extern __shared__ half row[];
  const int r = blockIdx.x;
  if (r < M) {
    for (int k = threadIdx.x; k < K; k += blockDim.x) row[k] = x[(size_t)r * K + k];
  }
  __syncthreads();
  for (int q = threadIdx.x; q < Kp / 8; q += blockDim.x) {
    __align__(16) half v[8];
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const int src = perm[8 * q + e];
      v[e] = (r < M && src >= 0) ? row[src] : __float2half(0.f);
    }
    const int c = q >> 3, p = q & 7;
    half* dst = xs + ((size_t)c * Mp + r) * WG_BK + ((p ^ (r & 7)) << 3);
    *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(v);
  }
}

// out[i] = the splits' partials of element i summed in split order.
extern "C" __global__ void gptq_wg_reduce(const float* __restrict__ part, half* __restrict__ out,
                                          long long mn, int splits) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= mn) return;
  float s = 0.f;
  for (int z = 0; z < splits; z++) s += part[z * mn + i];
  out[i] = __float2half(s);
}
