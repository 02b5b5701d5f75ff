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

__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
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

// Decode attention: one query token per sequence, on tensor cores. Grid
// (kv_heads, B, P), block NW warps. The G (<= 16) query heads of a KV head
// are the rows of one m16n8k16 A operand, so each K/V row is read once for
// all of them. Partition p covers keys [lo + p*PART, lo + (p+1)*PART) of
// the sequence's visible range [lo, pos]; its keys stream through shared
// memory in tiles of 16 * NW keys (K and V, ST stages of cp.async), warp w
// taking keys 16w..16w+15 of each tile with its own running max and sum.
// The partition's block-table entries are read into shared memory first,
// so the tile loads do not wait on them.
// Scores are rounded as HF's eager f16 arithmetic rounds them (f16 product
// times the f16 scale) and P to f16 before P V, as in flash prefill. Every
// boundary (partition, tile, warp) depends only on the sequence's own
// positions, so a sequence's result does not depend on the batch.
// Sequence b's query and output are row rows[b] of q and out [T, nh*D]
// (rows null: row b), so a mixed step's decode rows are read and written in
// place. P == 1: writes half(O / l) to out. P > 1: per (b, head, p) the max
// and sum (part_ml) and the unnormalised f32 output (part_o).
//
// Shared partitions (items non-null; grid (kv_heads, items, 1)): item i =
// items[i * ITEM_INTS ..] = {p, n, s_0 .. s_{n-1}} is partition p of the n
// (n * G <= 16) sequences s_j, which the host found to cover the same cache
// blocks there and to see all PART keys of it (no window cut). Row r of the
// tensor-core tile is head r % G of sequence s_{r / G}, so the partition's
// K/V is read once for all of them. A row's arithmetic is the same
// instruction sequence over the same keys as in its own block (the rows of
// an mma are independent), so its partials are bit-identical to the
// unshared kernel's. The unshared launch then skips partitions p < skip[b].
//
// F8 (an FP8 cache; ksc/vsc its scales): the stages hold a tile's codes and
// scales; each warp widens its own 16 keys of K and V into a warp-private
// f16 tile, then runs the same arithmetic on it.
//
// DIR (F8 "direct", the *_f8d builds; not yet the engine's): no widened
// tile. The mma fragments are the codes converted to f16 as they are
// (exact: every E4M3 value is an f16), read from code rows padded by 16
// bytes: K's with the k-steps' dims permuted so that a lane reads 4
// adjacent codes (Q's fragments permuted alike: a dot product does not
// depend on the order of its terms, up to the mma's own sum order), V's
// with each n-tile's dims spread so that a lane reads its codes of a key
// as one vector (column n of n-tile dn is dim n * D/8 + dn, undone when
// the output is written). K's scale multiplies the f32 score of its key
// after Q K^T; V's scale (times 256, to keep small products out of f16's
// subnormals) multiplies P before P's f16 rounding, and O is divided by
// 256 at the end. So the values are decode(code) * scale unrounded (the
// CPU cache's), and the results are not bit-identical to the f16 build
// over f16(decode * scale): the GPU test bounds them against float64.
#define PART 512
#define DIR_VSCALE 256.f
#define ITEM_INTS 18

template <int D, int NW, int ST, bool F8, bool DIR>
struct DecodeSmem {
  static constexpr int RS = D + 8;
  static constexpr int KT = 16 * NW;
  static constexpr int CS = DIR ? D + 16 : D;      // bytes per code row
  static constexpr int CODES = ST * 2 * KT * CS;   // bytes: [ST][K, V][KT][CS]
  static constexpr int SCALES = ST * 2 * KT * 4;  // bytes: [ST][K, V][KT] f32
  static constexpr int TILES = DIR ? 0 : NW * 2 * 16 * RS * 2;  // bytes: [NW][K, V][16][RS] halves
  // Bytes before the block table.
  static constexpr int BYTES = F8 ? CODES + SCALES + TILES : ST * 2 * KT * RS * 2;
};

template <int D, int NW, int ST, bool SH, bool F8, bool DIR>
__device__ void decode_impl(const half* __restrict__ q, const void* __restrict__ kcv,
                            const void* __restrict__ vcv, const float* __restrict__ ksc,
                            const float* __restrict__ vsc, const int* __restrict__ tables,
                            const int* __restrict__ ctx_lens, const unsigned* __restrict__ rows,
                            float* __restrict__ part_o, float* __restrict__ part_ml,
                            half* __restrict__ out, const int* __restrict__ items,
                            const unsigned* __restrict__ skip, int nh, int nkv, int max_blocks,
                            int block_size, int window, float scale, int P) {
  constexpr int RS = D + 8;   // smem row stride in halves
  constexpr int KS = D / 16;  // k-steps of Q K^T
  constexpr int DN = D / 8;   // n-tiles of P V
  constexpr int VPR = D / 8;  // int4 per row
  constexpr int KT = 16 * NW;  // keys per tile
  constexpr int NT = 32 * NW;  // threads
  using SM = DecodeSmem<D, NW, ST, F8, DIR>;
  constexpr int CS = SM::CS;
  // f16: [ST][K, V][KT][RS]; F8: codes, scales, warp tiles (DecodeSmem);
  // then the table.
  extern __shared__ __align__(16) half smem[];
  uint8_t* const codes = reinterpret_cast<uint8_t*>(smem);
  float* const scl = reinterpret_cast<float*>(codes + SM::CODES);
  half* const wtile = reinterpret_cast<half*>(codes + SM::CODES + SM::SCALES);
  const half* const kc = static_cast<const half*>(kcv);
  const half* const vc = static_cast<const half*>(vcv);
  const uint8_t* const k8 = static_cast<const uint8_t*>(kcv);
  const uint8_t* const v8 = static_cast<const uint8_t*>(vcv);
  const int kvh = blockIdx.x;
  const int* item = SH ? items + (size_t)blockIdx.y * ITEM_INTS : nullptr;
  const int b = SH ? item[2] : blockIdx.y;  // its table and context serve all
  const int p = SH ? item[0] : blockIdx.z;
  // Partitions p < skip[b] are shared items' (checked once the loads
  // below are in flight).
  const int sk = !SH && skip != nullptr ? (int)skip[b] : 0;
  const int G = nh / nkv;
  const int R = SH ? item[1] * G : G;  // live rows of the tile
  // Row r of a shared item: head kvh * G + r % G of sequence item[2 + r /
  // G], whose (sequence, head) partial is phead(r) and q/out row head(r).
  // (Without an item: head0 + r and qhead0 + r, hoisted below.)
  auto phead = [&](int r) { return (size_t)item[2 + r / G] * nh + kvh * G + r % G; };
  auto head = [&](int r) {
    const int s = item[2 + r / G];
    return (size_t)(rows != nullptr ? rows[s] : s) * nh + kvh * G + r % G;
  };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  // The block-table entries of a partition that starts at p * PART (no
  // window, or a context within it: the common case) load while
  // ctx_lens[b] is in flight; a window that cuts the context reloads them.
  int* tab = reinterpret_cast<int*>(codes + SM::BYTES);
  const int s0 = p * PART / block_size;
  const int ctx = ctx_lens[b];
  for (int i = threadIdx.x; i < PART / block_size + 2 && s0 + i < max_blocks; i += NT)
    tab[i] = tables[(size_t)b * max_blocks + s0 + i];
  if (p < sk) return;
  const int pos = ctx - 1;
  const int lo = window > 0 ? max(0, pos - window + 1) : 0;
  const int kstart = lo + p * PART;
  const int kend = min(pos + 1, kstart + PART);
  const size_t head0 = (size_t)b * nh + kvh * G;  // this group's first (b, head) partial
  const size_t qhead0 = (size_t)(rows != nullptr ? rows[b] : b) * nh + kvh * G;  // in q / out
  if (!SH && kstart >= kend) {  // (a shared item's partition is full)
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
      const size_t bh = head0 + i / D;
      if (P == 1) {
        out[(qhead0 + i / D) * D + i % D] = __float2half(0.f);
      } else {
        part_o[(bh * P + p) * D + i % D] = 0.f;
        if (i % D == 0) {
          part_ml[(bh * P + p) * 2] = -FLT_MAX;
          part_ml[(bh * P + p) * 2 + 1] = 0.f;
        }
      }
    }
    return;
  }
  const int row = nkv * D;
  const int b0 = kstart / block_size;
  if (b0 != s0) {  // the window moved the partition: its own entries
    __syncthreads();
    for (int i = threadIdx.x; i <= (kend - 1) / block_size - b0; i += NT)
      tab[i] = tables[(size_t)b * max_blocks + b0 + i];
  }
  __syncthreads();
  // The cache row of key kp (0 past kend: a zero-filled load).
  auto slot_of = [&](int kp) -> size_t {
    return kp < kend ? (size_t)tab[kp / block_size - b0] * block_size + kp % block_size : 0;
  };
  auto load = [&](int k0, int st) {
    if (F8) {
      constexpr int C = D / 16;  // 16-code vectors per row
      uint8_t* kb = codes + st * 2 * KT * CS;
      uint8_t* vb = kb + KT * CS;
      for (int i = threadIdx.x; i < KT * C; i += NT) {
        const int r = i / C, c = (i % C) * 16;
        const bool ok = k0 + r < kend;
        const size_t off = slot_of(k0 + r) * row + (size_t)kvh * D + c;
        cp_async16(kb + r * CS + c, k8 + off, ok);
        cp_async16(vb + r * CS + c, v8 + off, ok);
      }
      if (threadIdx.x < KT) {  // KT < NT: a row's two scales per thread
        const bool ok = k0 + (int)threadIdx.x < kend;
        const size_t so = slot_of(k0 + threadIdx.x) * nkv + kvh;
        float* sb = scl + st * 2 * KT + threadIdx.x;
        cp_async4(sb, ksc + so, ok);
        cp_async4(sb + KT, vsc + so, ok);
      }
      return;
    }
    half* ks = smem + st * 2 * KT * RS;
    half* vs = ks + KT * RS;
#pragma unroll
    for (int n = 0; n < KT * VPR / NT; n++) {  // VPR / 2 vectors of each matrix per thread
      const int i = threadIdx.x + n * NT;
      const int r = i / VPR, c = (i % VPR) * 8;
      const bool ok = k0 + r < kend;
      const size_t off = slot_of(k0 + r) * row + (size_t)kvh * D + c;
      cp_async16(ks + r * RS + c, kc + off, ok);
      cp_async16(vs + r * RS + c, vc + off, ok);
    }
  };
  const int ntiles = (kend - kstart + KT - 1) / KT;
#pragma unroll
  for (int i = 0; i < ST - 1; i++) {
    if (i < ntiles) load(kstart + i * KT, i);
    cp_async_commit();
  }

  // Q fragments: rows g and g + 8 (zero past R).
  uint32_t qa[KS][4];
  {
    const bool va = g < R, vb = g + 8 < R;
    const half* qra = q + (!va ? 0 : SH ? head(g) : qhead0 + g) * D;
    const half* qrb = q + (!vb ? 0 : SH ? head(g + 8) : qhead0 + g + 8) * D;
#pragma unroll
    for (int s = 0; s < KS; s++) {
      // DIR: k slots 2t, 2t + 1 | 2t + 8, 2t + 9 hold dims 4t .. 4t + 3.
      const int c0 = s * 16 + (DIR ? 4 : 2) * t, c2 = DIR ? c0 + 2 : c0 + 8;
      qa[s][0] = va ? *reinterpret_cast<const uint32_t*>(qra + c0) : 0u;
      qa[s][1] = vb ? *reinterpret_cast<const uint32_t*>(qrb + c0) : 0u;
      qa[s][2] = va ? *reinterpret_cast<const uint32_t*>(qra + c2) : 0u;
      qa[s][3] = vb ? *reinterpret_cast<const uint32_t*>(qrb + c2) : 0u;
    }
  }
  float o[DN][4];
#pragma unroll
  for (int i = 0; i < DN; i++)
#pragma unroll
    for (int r = 0; r < 4; r++) o[i][r] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const half sh = __float2half(scale);

  for (int it = 0; it < ntiles; it++) {
    // Tile it + ST - 1 goes into the stage tile it - 1 used (free since the
    // previous iteration's closing barrier); an empty group keeps the count.
    if (it + ST - 1 < ntiles) load(kstart + (it + ST - 1) * KT, (it + ST - 1) % ST);
    cp_async_commit();
    cp_async_wait<ST - 1>();
    __syncthreads();
    const half* ks = smem + (it % ST) * 2 * KT * RS + warp * 16 * RS;
    const half* vs = ks + KT * RS;
    // F8: this warp's 16 keys' K codes (V's KT * CS further) and K
    // scales (V's KT further) in the stage.
    const uint8_t* const kd = codes + (it % ST) * 2 * KT * CS + warp * 16 * CS;
    const float* const ksd = scl + (it % ST) * 2 * KT + warp * 16;
    if (F8 && !DIR) {  // widen this warp's 16 keys of K and V into its own tile
      constexpr int C = D / 16;
      half* kt = wtile + warp * 2 * 16 * RS;
      __syncwarp();  // the warp's reads of its previous tile are done
      for (int i = lane; i < 16 * C; i += 32) {
        const int r = i / C, c = (i % C) * 16;
        dequant16(kd + r * CS + c, ksd[r], kt + r * RS + c);
        dequant16(kd + KT * CS + r * CS + c, ksd[KT + r], kt + 16 * RS + r * RS + c);
      }
      __syncwarp();
      ks = kt;
      vs = kt + 16 * RS;
    }
    // S = Q K^T over this warp's 16 keys: 2 n-tiles of 8.
    float s[2][4];
    if (DIR) {
#pragma unroll
      for (int j = 0; j < 2; j++) {
#pragma unroll
        for (int r = 0; r < 4; r++) s[j][r] = 0.f;
        const uint8_t* kr = kd + (j * 8 + g) * CS + 4 * t;  // key j * 8 + g
#pragma unroll
        for (int k = 0; k < KS; k++) {
          const uint32_t w = *reinterpret_cast<const uint32_t*>(kr + k * 16);
          mma_16816(s[j], qa[k], e4m3x2_h2(w & 0xffffu), e4m3x2_h2(w >> 16));
        }
        // Column 2t + (r & 1): key j * 8 + 2t + (r & 1)'s scale.
#pragma unroll
        for (int r = 0; r < 4; r++) s[j][r] *= ksd[j * 8 + 2 * t + (r & 1)];
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; j++) qk_tile<KS, RS>(s[j], qa, ks + j * 8 * RS, lane);
    }
    const int k0 = kstart + it * KT + warp * 16;
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int j = 0; j < 2; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const bool vis = k0 + j * 8 + 2 * t + (r & 1) < kend;
        const float v = __half2float(__hmul(__float2half(s[j][r]), sh));
        s[j][r] = vis ? v : -INFINITY;
        mx[r >> 1] = fmaxf(mx[r >> 1], s[j][r]);
      }
    float alpha[2];
    online_softmax<2>(s, mx, mrow, lrow, alpha);
    // O += P V: one k-step of this warp's 16 keys, D/8 n-tiles.
    if (DIR) {
      // P's columns 2t, 2t + 1, 2t + 8, 2t + 9 times their keys' V scales.
      const float* vsd = ksd + KT;
      float f[4];
#pragma unroll
      for (int i = 0; i < 4; i++) f[i] = vsd[2 * t + (i & 1) + 8 * (i >> 1)] * DIR_VSCALE;
      const uint32_t pa[4] = {pack_h2(s[0][0] * f[0], s[0][1] * f[1]),
                              pack_h2(s[0][2] * f[0], s[0][3] * f[1]),
                              pack_h2(s[1][0] * f[2], s[1][1] * f[3]),
                              pack_h2(s[1][2] * f[2], s[1][3] * f[3])};
      // Lane g's codes of keys 2t, 2t + 1, 2t + 8, 2t + 9: dims g * DN ..
      const uint8_t* vr = kd + KT * CS + g * DN;
      uint32_t w[4][(DN + 3) / 4];
#pragma unroll
      for (int i = 0; i < 4; i++) load_codes<DN>(vr + (2 * t + (i & 1) + 8 * (i >> 1)) * CS, w[i]);
#pragma unroll
      for (int dn = 0; dn < DN; dn++) {
        const unsigned sel = (dn & 3) | ((4 + (dn & 3)) << 4);
        const uint32_t b0 = e4m3x2_h2(__byte_perm(w[0][dn >> 2], w[1][dn >> 2], sel) & 0xffffu);
        const uint32_t b1 = e4m3x2_h2(__byte_perm(w[2][dn >> 2], w[3][dn >> 2], sel) & 0xffffu);
#pragma unroll
        for (int i = 0; i < 4; i++) o[dn][i] = o[dn][i] * alpha[i >> 1];
        mma_16816(o[dn], pa, b0, b1);
      }
      __syncthreads();  // the next load overwrites this stage
      continue;
    }
    const uint32_t pa[4] = {pack_h2(s[0][0], s[0][1]), pack_h2(s[0][2], s[0][3]),
                            pack_h2(s[1][0], s[1][1]), pack_h2(s[1][2], s[1][3])};
#pragma unroll
    for (int dn = 0; dn < DN; dn += 2) {
      uint32_t bb[4];
      ldsm_x4_t(bb, vs + (lane & 15) * RS + dn * 8 + (lane >> 4) * 8);
#pragma unroll
      for (int i = 0; i < 4; i++) o[dn][i] = o[dn][i] * alpha[i >> 1];
#pragma unroll
      for (int i = 0; i < 4; i++) o[dn + 1][i] = o[dn + 1][i] * alpha[i >> 1];
      mma_16816(o[dn], pa, bb[0], bb[1]);
      mma_16816(o[dn + 1], pa, bb[2], bb[3]);
    }
    __syncthreads();  // the next load overwrites this stage
  }
  if (DIR) {  // P carried V's scales times DIR_VSCALE (exact: a power of 2)
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
#pragma unroll
      for (int i = 0; i < 4; i++) o[dn][i] *= 1.f / DIR_VSCALE;
  }
  // Combine the warps' partial results per query head through smem.
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    lrow[hr] += __shfl_xor_sync(0xffffffffu, lrow[hr], 1);
    lrow[hr] += __shfl_xor_sync(0xffffffffu, lrow[hr], 2);
  }
  float* red_o = reinterpret_cast<float*>(smem);  // [NW][R][D]
  float* red_m = red_o + NW * R * D;              // [NW][R]
  float* red_l = red_m + NW * R;
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    const int r = g + 8 * hr;
    if (r >= R) continue;
    float* dst = red_o + (warp * R + r) * D;
#pragma unroll
    for (int dn = 0; dn < DN; dn++) {
      // Column 2t (+1) of n-tile dn: dim dn * 8 + 2t, DIR: (2t) * DN + dn.
      dst[DIR ? 2 * t * DN + dn : dn * 8 + 2 * t] = o[dn][2 * hr];
      dst[DIR ? (2 * t + 1) * DN + dn : dn * 8 + 2 * t + 1] = o[dn][2 * hr + 1];
    }
    if (t == 0) {
      red_m[warp * R + r] = mrow[hr];
      red_l[warp * R + r] = lrow[hr];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < R * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; w++) m = fmaxf(m, red_m[w * R + r]);
    float l = 0.f, acc = 0.f;
#pragma unroll
    for (int w = 0; w < NW; w++) {
      const float mw = red_m[w * R + r];
      if (mw == -INFINITY) continue;
      const float c = expf(mw - m);
      l += red_l[w * R + r] * c;
      acc += red_o[(w * R + r) * D + d] * c;
    }
    const size_t bh = SH ? phead(r) : head0 + r;
    if (P == 1) {
      out[(SH ? head(r) : qhead0 + r) * D + d] = __float2half(l > 0.f ? acc / l : 0.f);
    } else {
      part_o[(bh * P + p) * D + d] = acc;
      if (d == 0) {
        part_ml[(bh * P + p) * 2] = m;
        part_ml[(bh * P + p) * 2 + 1] = l;
      }
    }
  }
}

// Two entries per build: the per-sequence launch (`items` unused) and the
// shared items' (`skip` unused); the same source, so the same arithmetic
// per row (the GPU test checks it bit for bit). ksc/vsc: the FP8 builds'
// scales (unused by the f16 builds).
#define DECODE_ENTRY(NAME, D, NW, ST, SH, F8, DIR)                                              \
  extern "C" __global__ void __launch_bounds__(32 * NW) NAME(                                   \
      const half* q, const void* kc, const void* vc, const float* ksc, const float* vsc,        \
      const int* tables, const int* ctx_lens, const unsigned* rows, float* part_o,              \
      float* part_ml, half* out, const int* items, const unsigned* skip, int nh, int nkv,       \
      int max_blocks, int block_size, int window, float scale, int P) {                         \
    decode_impl<D, NW, ST, SH, F8, DIR>(q, kc, vc, ksc, vsc, tables, ctx_lens, rows, part_o,     \
                                        part_ml, out, items, skip, nh, nkv, max_blocks,        \
                                        block_size, window, scale, P);                         \
  }
#define DECODE(D, NW, ST)                                                         \
  DECODE_ENTRY(paged_decode_d##D##_w##NW##s##ST, D, NW, ST, false, false, false)  \
  DECODE_ENTRY(paged_decode_shared_d##D##_w##NW##s##ST, D, NW, ST, true, false, false)
// The FP8 cache's builds: the engine's (2 warps, 2 stages, widening), and
// the direct builds (DIR) of 2 and 3 stages.
#define DECODE_F8(D)                                                             \
  DECODE_ENTRY(paged_decode_f8_d##D##_w2s2, D, 2, 2, false, true, false)         \
  DECODE_ENTRY(paged_decode_shared_f8_d##D##_w2s2, D, 2, 2, true, true, false)   \
  DECODE_ENTRY(paged_decode_f8d_d##D##_w2s2, D, 2, 2, false, true, true)         \
  DECODE_ENTRY(paged_decode_shared_f8d_d##D##_w2s2, D, 2, 2, true, true, true)   \
  DECODE_ENTRY(paged_decode_f8d_d##D##_w2s3, D, 2, 3, false, true, true)         \
  DECODE_ENTRY(paged_decode_shared_f8d_d##D##_w2s3, D, 2, 3, true, true, true)
#define DECODE_VARIANTS(D) \
  DECODE(D, 2, 2)          \
  DECODE(D, 4, 2)          \
  DECODE(D, 2, 3)          \
  DECODE(D, 4, 3)          \
  DECODE(D, 2, 4)
DECODE_VARIANTS(16)
DECODE_VARIANTS(32)
DECODE_VARIANTS(64)
DECODE_VARIANTS(128)
DECODE_F8(16)
DECODE_F8(32)
DECODE_F8(64)
DECODE_F8(128)

// Combines the partitions: grid (B * nh), block D threads (D <= 1024);
// sequence b's output goes to row rows[b] of out (rows null: row b).
extern "C" __global__ void paged_decode_combine(const float* __restrict__ part_o,
                                                const float* __restrict__ part_ml,
                                                const unsigned* __restrict__ rows,
                                                half* __restrict__ out, int nh, int D, int P) {
  size_t bh = blockIdx.x;
  int d = threadIdx.x;
  if (d >= D) return;
  const size_t b = bh / nh;
  const size_t ob = (rows != nullptr ? rows[b] : b) * nh + bh % nh;
  float mx = -FLT_MAX;
  for (int p = 0; p < P; p++) mx = fmaxf(mx, part_ml[(bh * P + p) * 2]);
  float l = 0.f, o = 0.f;
  for (int p = 0; p < P; p++) {
    float mp = part_ml[(bh * P + p) * 2];
    if (mp == -FLT_MAX) continue;
    float c = __expf(mp - mx);
    l += part_ml[(bh * P + p) * 2 + 1] * c;
    o += part_o[(bh * P + p) * D + d] * c;
  }
  out[ob * D + d] = __float2half(l > 0.f ? o / l : 0.f);
}

// Prefill attention over the paged cache, flash style (never materializes
// the scores), head dims 16/32/64/128 (D). One block = 4 warps = 128 query
// rows: MT = 128 / G tokens of one chunk times the G query heads of one KV
// head (G = heads / kv_heads: 1, 2, 4 or 8), so each K/V tile is read once
// for all G heads. Row r of the block is token r % MT of head kvh * G + r /
// MT; warp w owns rows 32w..32w+31 as two m16 tiles, each 16 consecutive
// tokens of one head, and every K and V fragment it loads feeds both. Q
// sits in shared memory; key tiles of 32 (K and V rows gathered from the
// cache through the chunk's slot list, read a tile ahead) stream behind it
// through three cp.async stages, one barrier per tile. Per tile: S = Q K^T
// on tensor cores (mma m16n8k16, f32 accumulate), rounded as HF's eager f16
// arithmetic rounds it (the f16 product times the f16 scale), the causal
// and sliding-window mask (only on tiles that cross a boundary), online
// softmax in f32 (running max and sum per row; O is rescaled only when a
// row's max moved), P rounded to f16 and O += P V on tensor cores; O / l at
// the end. HF eager normalizes P before rounding it, so results differ from
// it by f16 rounding only. A row's arithmetic depends only on its own
// position (key tiles are aligned to multiples of 32 positions), not on
// the chunk, the tile or the batch it comes in.
//
// tiles[i] = (first row of the tile in q/out, tokens (<= MT), position of
// the first token, offset of the chunk's slot list in `keys`); keys[off + j]
// is the cache row of position j of that chunk's sequence.
//
// F8 (an FP8 cache; ksc/vsc its scales): the stages hold a key tile's codes
// and scales; the block widens the current one into one f16 K/V tile (one
// more barrier per tile) and runs the same arithmetic on it.
#define FP_KT 32
#define FP_ROWS 128
#define FP_STAGES 3

// S[mt] = Q K^T for a warp's two m16 tiles (rows 16 apart from `qrows`,
// RS halves per row, in shared memory) over the 32 keys of `ks`, one k-step
// of 16 dims at a time: each K fragment is loaded once for both tiles.
template <int KS, int RS>
__device__ __forceinline__ void qk_tiles(float (&s)[2][4][4], const half* qrows, const half* ks,
                                         int lane) {
  zero_acc(s);
#pragma unroll
  for (int k = 0; k < KS; k++) {
    uint32_t qa[2][4];  // A fragments: rows lane & 15, dims 16k + (lane >> 4) * 8
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
      ldsm_x4(qa[mt], qrows + (mt * 16 + (lane & 15)) * RS + k * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int j = 0; j < 4; j++) {
      uint32_t b[2];  // the 8 keys of n-tile j, d 16k (+8)
      ldsm_x2(b, ks + (j * 8 + (lane & 7)) * RS + k * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
      for (int mt = 0; mt < 2; mt++) mma_16816(s[mt][j], qa[mt], b[0], b[1]);
    }
  }
}

template <int FP_D, bool F8>
__device__ void flash_prefill_impl(const half* __restrict__ q, const void* __restrict__ kcv,
                                   const void* __restrict__ vcv, const float* __restrict__ ksc,
                                   const float* __restrict__ vsc,
                                   const unsigned* __restrict__ keys,
                                   const int4* __restrict__ tiles, half* __restrict__ out,
                                   int heads, int kv_heads, int window, float scale) {
  constexpr int RS = FP_D + 8;  // smem row stride in halves (no bank conflicts at 128)
  constexpr int KS = FP_D / 16; // k-steps of Q K^T
  constexpr int DN = FP_D / 8;  // n-tiles of P V; 16-byte chunks per row
  constexpr int CH = FP_KT * DN; // chunks per matrix and tile (a multiple of 32)
  constexpr int C8 = FP_D / 16;  // F8: 16-code chunks per row
  constexpr int CH8 = FP_KT * C8;  // F8: chunks per matrix and tile (a multiple of 32)
  // Q [128][RS], then f16: [stages][K, V][32][RS]; F8: codes [stages][K,
  // V][32][D] bytes, scales [stages][K, V][32] f32, the f16 tile [K, V][32][RS].
  extern __shared__ __align__(16) half smem[];
  half* qs = smem;
  half* kvs = smem + FP_ROWS * RS;
  uint8_t* const codes = reinterpret_cast<uint8_t*>(kvs);
  float* const scl = reinterpret_cast<float*>(codes + FP_STAGES * 2 * FP_KT * FP_D);
  half* const wide = reinterpret_cast<half*>(scl + FP_STAGES * 2 * FP_KT);
  const half* const kc = static_cast<const half*>(kcv);
  const half* const vc = static_cast<const half*>(vcv);
  const uint8_t* const k8 = static_cast<const uint8_t*>(kcv);
  const uint8_t* const v8 = static_cast<const uint8_t*>(vcv);
  const int4 tile = tiles[blockIdx.x];
  const int row0 = tile.x, rows = tile.y, pos0 = tile.z, koff = tile.w;
  const int kvh = blockIdx.y, G = heads / kv_heads, MT = FP_ROWS / G;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const size_t qstride = (size_t)heads * FP_D, kvstride = (size_t)kv_heads * FP_D;

  // Q rows (token r % MT of head kvh * G + r / MT; zeros past `rows`).
  for (int i = threadIdx.x; i < FP_ROWS * DN; i += 128) {
    const int r = i / DN, c = (i % DN) * 8, tok = r % MT;
    const bool ok = tok < rows;
    cp_async16(qs + r * RS + c,
               q + (size_t)(row0 + (ok ? tok : 0)) * qstride + (kvh * G + r / MT) * FP_D + c, ok);
  }
  const int kmax = pos0 + rows - 1;  // last visible key of the tile
  const int kmin = window > 0 ? max(0, pos0 - window + 1) : 0;
  const int t0 = kmin / FP_KT, t1 = kmax / FP_KT;  // key tiles, inclusive

  // Lane j holds the cache slot of row j of the next tile to load (read
  // a tile ahead); the loads take it by shuffle, so none waits on it.
  unsigned myslot = 0;
  auto fetch = [&](int kt) {
    const int j = kt * FP_KT + lane;
    myslot = j <= kmax ? __ldg(keys + koff + j) : 0u;
  };
  // Loads key tile `kt` into stage `st`: 32 rows x D/8 int4 per matrix.
  auto load = [&](int kt, int st) {
    if (F8) {
      uint8_t* kb = codes + st * 2 * FP_KT * FP_D;
      uint8_t* vb = kb + FP_KT * FP_D;
#pragma unroll
      for (int i = 0; i < (CH8 + 127) / 128; i++) {
        const int idx = threadIdx.x + i * 128;
        if (CH8 % 128 == 0 || idx < CH8) {  // uniform over a warp (CH8 % 32 == 0)
          const int r = idx / C8, c = (idx % C8) * 16;
          const bool ok = kt * FP_KT + r <= kmax;
          const size_t slot = __shfl_sync(0xffffffffu, myslot, r);
          cp_async16(kb + r * FP_D + c, k8 + slot * kvstride + kvh * FP_D + c, ok);
          cp_async16(vb + r * FP_D + c, v8 + slot * kvstride + kvh * FP_D + c, ok);
        }
      }
      if (threadIdx.x < 64) {  // warp 0: K's scales, warp 1: V's
        const bool ok = kt * FP_KT + lane <= kmax;
        const size_t slot = __shfl_sync(0xffffffffu, myslot, lane);
        cp_async4(scl + (st * 2 + warp) * FP_KT + lane,
                  (warp ? vsc : ksc) + slot * kv_heads + kvh, ok);
      }
      return;
    }
    half* ks = kvs + st * 2 * FP_KT * RS;
    half* vs = ks + FP_KT * RS;
#pragma unroll
    for (int i = 0; i < (CH + 127) / 128; i++) {
      const int idx = threadIdx.x + i * 128;
      if (CH % 128 == 0 || idx < CH) {  // uniform over a warp (CH % 32 == 0)
        const int r = idx / DN, c = (idx % DN) * 8;
        const bool ok = kt * FP_KT + r <= kmax;
        const size_t slot = __shfl_sync(0xffffffffu, myslot, r);
        cp_async16(ks + r * RS + c, kc + slot * kvstride + kvh * FP_D + c, ok);
        cp_async16(vs + r * RS + c, vc + slot * kvstride + kvh * FP_D + c, ok);
      }
    }
  };

  float o[2][DN][4];
  zero_acc(o);
  float mrow[2][2], lrow[2][2];
  int tok0[2];  // token of row g of each m16 tile (row g + 8: tok0 + 8)
#pragma unroll
  for (int mt = 0; mt < 2; mt++) {
    tok0[mt] = (warp * 32 + mt * 16) % MT + g;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      mrow[mt][hr] = -INFINITY;
      lrow[mt][hr] = 0.f;
    }
  }
  const half2 sh2 = __float2half2_rn(scale);
  const half* qrows = qs + warp * 32 * RS;

  // Prologue: tiles t0 and t0 + 1 in flight (Q with the first); a group
  // is committed for every tile index, empty past t1, so that waiting for
  // all but the newest group always means the current tile has landed.
  fetch(t0);
  load(t0, 0);
  cp_async_commit();
  if (t0 + 1 <= t1) {
    fetch(t0 + 1);
    load(t0 + 1, 1);
  }
  cp_async_commit();
  if (t0 + 2 <= t1) fetch(t0 + 2);
  for (int kt = t0; kt <= t1; kt++) {
    cp_async_wait<1>();
    __syncthreads();  // tile kt is in; every warp is done with tile kt - 1
    const int st = (kt - t0) % FP_STAGES;
    if (kt + 2 <= t1) {  // into the stage tile kt - 1 used
      load(kt + 2, (kt - t0 + 2) % FP_STAGES);
      if (kt + 3 <= t1) fetch(kt + 3);
    }
    cp_async_commit();
    const half* ks = kvs + st * 2 * FP_KT * RS;
    const half* vs = ks + FP_KT * RS;
    if (F8) {  // widen the tile (the barrier above: every warp is done with the last one)
      const uint8_t* kb = codes + st * 2 * FP_KT * FP_D;
      const float* sb = scl + st * 2 * FP_KT;
      for (int i = threadIdx.x; i < 2 * CH8; i += 128) {
        const int m = i / CH8, j = i % CH8, r = j / C8, c = (j % C8) * 16;
        dequant16(kb + (m * FP_KT + r) * FP_D + c, sb[m * FP_KT + r],
                  wide + (m * FP_KT + r) * RS + c);
      }
      __syncthreads();
      ks = wide;
      vs = wide + FP_KT * RS;
    }

    float s[2][4][4];
    qk_tiles<KS, RS>(s, qrows, ks, lane);
    // Round as HF (f16 product times f16 scale); mask only a tile that
    // crosses the causal diagonal or the window's edge (the same for
    // every row of the block: uniform branch).
    const bool inside =
        kt * FP_KT + FP_KT - 1 <= pos0 && (window <= 0 || kt * FP_KT > kmax - window);
    uint32_t pa[2][2][4];  // P as f16 A fragments of the 2 k-steps of 16 keys
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
      float mx[2] = {mrow[mt][0], mrow[mt][1]};
#pragma unroll
      for (int j = 0; j < 4; j++)
#pragma unroll
        for (int hr = 0; hr < 2; hr++) {
          const float2 f = __half22float2(
              __hmul2(__floats2half2_rn(s[mt][j][2 * hr], s[mt][j][2 * hr + 1]), sh2));
          float v[2] = {f.x, f.y};
#pragma unroll
          for (int c = 0; c < 2; c++) {
            if (!inside) {
              const int kp = kt * FP_KT + j * 8 + 2 * t + c, tok = tok0[mt] + 8 * hr;
              const int qp = pos0 + tok;
              const bool vis = tok < rows && kp <= qp && (window <= 0 || kp > qp - window);
              v[c] = vis ? v[c] : -INFINITY;
            }
            s[mt][j][2 * hr + c] = v[c];
            mx[hr] = fmaxf(mx[hr], v[c]);
          }
        }
      float alpha[2];
      online_softmax<4>(s[mt], mx, mrow[mt], lrow[mt], alpha);
      // o * 1 = o: skip the rescale when no row of the warp's tile moved.
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < DN; i++) {
          o[mt][i][0] *= alpha[0];
          o[mt][i][1] *= alpha[0];
          o[mt][i][2] *= alpha[1];
          o[mt][i][3] *= alpha[1];
        }
      }
#pragma unroll
      for (int kk = 0; kk < 2; kk++) {
        pa[mt][kk][0] = pack_h2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][kk][1] = pack_h2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][kk][2] = pack_h2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][kk][3] = pack_h2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }
    // O += P V: 2 k-steps of 16 keys, D/8 n-tiles of 8 dims; each V
    // fragment feeds both m16 tiles.
#pragma unroll
    for (int kk = 0; kk < 2; kk++) {
#pragma unroll
      for (int dn = 0; dn < DN; dn += 2) {
        // m0/m1: keys 16kk (+8), dims dn*8; m2/m3: dims (dn+1)*8.
        uint32_t b[4];
        ldsm_x4_t(b, vs + (kk * 16 + (lane & 15)) * RS + dn * 8 + (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
          mma_16816(o[mt][dn], pa[mt][kk], b[0], b[1]);
          mma_16816(o[mt][dn + 1], pa[mt][kk], b[2], b[3]);
        }
      }
    }
  }
#pragma unroll
  for (int mt = 0; mt < 2; mt++) {
    const int h = kvh * G + (warp * 32 + mt * 16) / MT;
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      float l = lrow[mt][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int tok = tok0[mt] + 8 * hr;
      if (tok >= rows) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      half* dst = out + (size_t)(row0 + tok) * qstride + h * FP_D + 2 * t;
#pragma unroll
      for (int dn = 0; dn < DN; dn++)
        *reinterpret_cast<half2*>(dst + dn * 8) =
            __floats2half2_rn(o[mt][dn][2 * hr] * inv, o[mt][dn][2 * hr + 1] * inv);
    }
  }
}

#define FLASH_PREFILL_ENTRY(NAME, D, F8)                                                        \
  extern "C" __global__ void __launch_bounds__(128, 2) NAME(                                    \
      const half* q, const void* kc, const void* vc, const float* ksc, const float* vsc,        \
      const unsigned* keys, const int4* tiles, half* out, int heads, int kv_heads, int window,  \
      float scale) {                                                                           \
    flash_prefill_impl<D, F8>(q, kc, vc, ksc, vsc, keys, tiles, out, heads, kv_heads, window,  \
                              scale);                                                          \
  }
#define FLASH_PREFILL(D)                                  \
  FLASH_PREFILL_ENTRY(flash_prefill_d##D, D, false)       \
  FLASH_PREFILL_ENTRY(flash_prefill_f8_d##D, D, true)
FLASH_PREFILL(16)
FLASH_PREFILL(32)
FLASH_PREFILL(64)
FLASH_PREFILL(128)
