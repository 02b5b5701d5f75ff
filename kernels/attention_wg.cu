// Hopper (sm_90a) wgmma flash prefill (issue 15, item 3;
// kernels/WGMMA-PREFILL-PLAN.md): step 1, a self-test of its two
// warpgroup products over its shared-memory layout (GPU test
// `gpu::flash_prefill::wgmma_prefill_products_match_float64`), and a first
// plain kernel, `flash_prefill_wg_d128` (no producer warp yet: both
// warpgroups load), checked against float64 beside the mma.sync kernel
// in `gpu::flash_prefill::flash_prefill_matches_a_float64_reference`.
//
// The layout (Q, K and V alike; a "row" is a query row or a key): two
// panels, dims 0-63 and 64-127, each ROWS rows of 128 bytes; the 16-byte
// chunk c (0..15) of row r lies in panel c >> 3 at byte r * 128 + (((c & 7)
// ^ (r & 7)) << 4): the 128-byte swizzle, so the tile must start on a
// 1,024-byte boundary.
#include <cuda_fp16.h>
#include <stdint.h>

#include "mma.cuh"
#include "softmax.cuh"
#include "wgmma.cuh"

#define WG_D 128

// Byte offset of chunk c of row r in a two-panel tile of `rows` rows.
__device__ __forceinline__ int sw128(int r, int c, int rows) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
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

  // S = Q K^T: 8 k-steps of 16 dims, 32 bytes apart within a panel (the
  // first one overwrites S).
  float s[64];
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const int off = (kk & 3) * 32;
    const uint64_t da = wg_desc_sw128(qs + (kk >> 2) * 64 * 128 + off, 16, 1024);
    const uint64_t db = wg_desc_sw128(ks + (kk >> 2) * 128 * 128 + off, 16, 1024);
    wg_ss_m64n128k16(s, da, db, kk > 0);
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

// The wgmma flash prefills, D = 128, f16 cache (the twin's arguments; the
// FP8 scales unused): the mma.sync kernel's work list, row mapping, score
// rounding, mask and online softmax (attention_prefill.cuh), with 128-key
// tiles and two warpgroups of 64 rows each (warp w = 4c + u of warpgroup c
// owns rows 16w..16w+15, 16 consecutive tokens of one head since 128 / G >=
// 16). Per tile: S [64 x 128] = Q K^T from shared memory (wg_ss), the
// scores rounded and masked as in the twin, online softmax over its 16
// n-tiles, P packed to f16 A fragments, O += P V with V read transposed.
// A row's softmax moves its max at 128-key boundaries (the twin: 32), so
// the results are the twin's up to f16 rounding, not bit for bit; a row
// still depends only on its own position (tiles aligned to multiples of
// 128 positions). The two kernels differ only in scheduling and give the
// same bits: `flash_prefill_wg_d128` (plain: both warpgroups load, two
// block barriers a tile) and `flash_prefill_ws_d128` (attention_ws.cuh: a
// producer warpgroup, mbarriers, S_n beside PV_{n-1}, pingpong).
#define WG_KT 128
#define WG_ROWS 128
#define WG_QBYTES (WG_ROWS * 256)
#define WG_TBYTES (WG_KT * 256)

// The twin's arguments (the FP8 scales unused), and the Q tile at the
// first 1,024-byte boundary of the dynamic shared memory.
#define WG_PREFILL_PARAMS                                                                 \
  const half *__restrict__ q, const half *__restrict__ kc, const half *__restrict__ vc,   \
      const float * /* ksc: FP8 only */, const float * /* vsc */,                        \
      const unsigned *__restrict__ keys, const int4 *__restrict__ tiles,                 \
      half *__restrict__ out, int heads, int kv_heads, int window, float scale
#define WG_SMEM_Q                                                      \
  extern __shared__ uint8_t wg_smem[];                                 \
  uint8_t* const qs = reinterpret_cast<uint8_t*>(                      \
      (reinterpret_cast<uintptr_t>(wg_smem) + 1023) & ~(uintptr_t)1023)

// What a block works on: its tile of the host's list and its KV head.
struct WgTile {
  int row0, rows, pos0, koff, kvh, G, MT, kmax, kmin, t0, t1;
  size_t qstride, kvstride;
};

__device__ __forceinline__ WgTile wg_tile(const int4* tiles, int tile, int kvh, int heads,
                                          int kv_heads, int window) {
  const int4 tl = tiles[tile];
  WgTile w;
  w.row0 = tl.x, w.rows = tl.y, w.pos0 = tl.z, w.koff = tl.w;
  w.kvh = kvh, w.G = heads / kv_heads, w.MT = WG_ROWS / w.G;
  w.kmax = w.pos0 + w.rows - 1;
  w.kmin = window > 0 ? max(0, w.pos0 - window + 1) : 0;
  w.t0 = w.kmin / WG_KT, w.t1 = w.kmax / WG_KT;
  w.qstride = (size_t)heads * WG_D, w.kvstride = (size_t)kv_heads * WG_D;
  return w;
}

// Chunk i (of WG_ROWS * 16) of the Q tile: row r = token r % MT of head
// kvh * G + r / MT, zeros past `rows`.
__device__ __forceinline__ void wg_load_q(uint8_t* qs, const half* q, const WgTile& w, int i) {
  const int r = i >> 4, c = i & 15, tok = r % w.MT;
  const bool ok = tok < w.rows;
  cp_async16(qs + sw128(r, c, WG_ROWS),
             q + (size_t)(w.row0 + (ok ? tok : 0)) * w.qstride + (w.kvh * w.G + r / w.MT) * WG_D +
                 c * 8,
             ok);
}

// The scores of a warp's rows rounded as the twin does (f16, times the f16
// scale, back to f32), with MASK those of key offsets j * 8 + c (c = 0, 1;
// the thread's keys are kt * 128 + 2t + offset) outside (lo[hr], hi[hr]]
// set to -inf; returns the rows' maxima over the thread's scores and mx.
template <bool MASK>
__device__ __forceinline__ void wg_round(float (&s)[16][4], float (&mx)[2], half2 sh2,
                                         const int (&lo)[2], const int (&hi)[2]) {
#pragma unroll
  for (int j = 0; j < 16; j++)
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      const float2 f =
          __half22float2(__hmul2(__floats2half2_rn(s[j][2 * hr], s[j][2 * hr + 1]), sh2));
      s[j][2 * hr] = f.x;
      s[j][2 * hr + 1] = f.y;
      if (MASK) {
#pragma unroll
        for (int c = 0; c < 2; c++) {
          const int off = j * 8 + c;
          s[j][2 * hr + c] = off > lo[hr] && off <= hi[hr] ? s[j][2 * hr + c] : -INFINITY;
        }
      }
    }
  // The maxima as a tree (max is exact in any order).
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    float m[16];
#pragma unroll
    for (int j = 0; j < 16; j++) m[j] = fmaxf(s[j][2 * hr], s[j][2 * hr + 1]);
#pragma unroll
    for (int j = 0; j < 8; j++) m[j] = fmaxf(m[j], m[j + 8]);
#pragma unroll
    for (int j = 0; j < 4; j++) m[j] = fmaxf(m[j], m[j + 4]);
    m[0] = fmaxf(fmaxf(m[0], m[2]), fmaxf(m[1], m[3]));
    mx[hr] = fmaxf(mx[hr], m[0]);
  }
}

// A warp's rows (16w + g and + 8): the scores of key tile kt rounded as
// the twin does, masked outside the causal / window range (only on the
// tiles that reach past a row's position or before its window), then the
// online softmax; returns alpha.
__device__ __forceinline__ void wg_softmax(float (&s)[16][4], const WgTile& w, int kt, int tok0,
                                           int window, half2 sh2, float* mrow, float* lrow,
                                           float* alpha) {
  const bool inside =
      kt * WG_KT + WG_KT - 1 <= w.pos0 && (window <= 0 || kt * WG_KT > w.kmax - window);
  float mx[2] = {mrow[0], mrow[1]};
  int lo[2] = {-1, -1}, hi[2] = {WG_KT, WG_KT};
  if (inside) {
    wg_round<false>(s, mx, sh2, lo, hi);
  } else {
    // Key kp = base + offset is visible to the row of token tok (position
    // qp) when tok < rows, kp <= qp and, with a window, kp > qp - window.
    const int base = kt * WG_KT + 2 * (threadIdx.x & 3);
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      const int tok = tok0 + 8 * hr, qp = w.pos0 + tok;
      hi[hr] = tok < w.rows ? qp - base : -1;
      lo[hr] = window > 0 ? qp - window - base : -1;
    }
    wg_round<true>(s, mx, sh2, lo, hi);
  }
  online_softmax<16>(s, mx, mrow, lrow, alpha);
}

// O *= alpha (skipped when the warp's rows all kept their max: o * 1 = o).
__device__ __forceinline__ void wg_rescale(float (&o)[16][4], const float* alpha) {
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int i = 0; i < 16; i++) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
  }
}

// P as the A fragments of 8 k-steps of 16 keys.
__device__ __forceinline__ void wg_pack_p(uint32_t (&pa)[8][4], const float (&s)[16][4]) {
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    pa[kk][0] = pack_h2(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = pack_h2(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = pack_h2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = pack_h2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

__device__ __forceinline__ void wg_zero(float (&a)[16][4]) {
#pragma unroll
  for (int i = 0; i < 16; i++)
#pragma unroll
    for (int r = 0; r < 4; r++) a[i][r] = 0.f;
}

// Issues S = Q K^T for a warpgroup's 64 rows (qwg) against K tile kb (the
// first k-step overwrites S).
__device__ __forceinline__ void wg_issue_qk(float (&s)[16][4], const uint8_t* qwg,
                                            const uint8_t* kb) {
  float(&sf)[64] = *reinterpret_cast<float(*)[64]>(&s[0][0]);
  // k-step kk: 32 bytes on within a panel, the second panel from kk = 4
  // (descriptor addresses count 16-byte units).
  const uint64_t qd = wg_desc_sw128(qwg, 16, 1024), kd = wg_desc_sw128(kb, 16, 1024);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++) {
    const int off = (kk & 3) * 2;
    wg_ss_m64n128k16(sf, qd + (kk >> 2) * (WG_QBYTES / 32) + off,
                     kd + (kk >> 2) * (WG_TBYTES / 32) + off, kk > 0);
  }
  wg_commit();
}

// Issues O += P V against V tile vb (read transposed).
__device__ __forceinline__ void wg_issue_pv(float (&o)[16][4], const uint32_t (&pa)[8][4],
                                            const uint8_t* vb) {
  float(&of)[64] = *reinterpret_cast<float(*)[64]>(&o[0][0]);
  // k-step kk: keys 16kk.., 2,048 bytes on.
  const uint64_t vd = wg_desc_sw128(vb, WG_TBYTES / 2, 1024);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; kk++) wg_m64n128k16_tb(of, pa[kk], vd + kk * 128);
  wg_commit();
}

// Keeps reads and writes of an accumulator after the wait that ends it.
__device__ __forceinline__ void wg_keep_all(float (&a)[16][4]) {
#pragma unroll
  for (int i = 0; i < 16; i++)
#pragma unroll
    for (int r = 0; r < 4; r++) wg_keep(a[i][r]);
}

// O / l for the warp's rows, f16, rows past `rows` not written.
__device__ __forceinline__ void wg_store_out(half* out, const float (&o)[16][4], const float* lrow,
                                             const WgTile& w, int warp) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int tok0 = (warp * 16) % w.MT + g;
  const int h = w.kvh * w.G + (warp * 16) / w.MT;
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    float l = lrow[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int tok = tok0 + 8 * hr;
    if (tok >= w.rows) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    half* dst = out + (size_t)(w.row0 + tok) * w.qstride + h * WG_D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < 16; dn++)
      *reinterpret_cast<half2*>(dst + dn * 8) =
          __floats2half2_rn(o[dn][2 * hr] * inv, o[dn][2 * hr + 1] * inv);
  }
}

// Shared memory: Q (128 rows) then 2 stages of K and V (128 rows each), all
// in the two-panel layout, 1,024-aligned.
extern "C" __global__ void __launch_bounds__(256, 1)
    flash_prefill_wg_d128(WG_PREFILL_PARAMS) {
  WG_SMEM_Q;
  uint8_t* const kvs = qs + WG_QBYTES;  // stage st: K at kvs + 2 st T, V after it
  const WgTile w = wg_tile(tiles, blockIdx.x, blockIdx.y, heads, kv_heads, window);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wgi = warp >> 2;

  for (int i = threadIdx.x; i < WG_ROWS * 16; i += 256) wg_load_q(qs, q, w, i);
  // Key tile kt into stage st: K and V rows gathered through the slot list
  // (zeros past kmax: V must be finite there).
  auto load = [&](int kt, int st) {
    uint8_t* kb = kvs + st * 2 * WG_TBYTES;
    uint8_t* vb = kb + WG_TBYTES;
    for (int i = threadIdx.x; i < WG_KT * 16; i += 256) {
      const int r = i >> 4, c = i & 15, j = kt * WG_KT + r;
      const bool ok = j <= w.kmax;
      const size_t slot = ok ? __ldg(keys + w.koff + j) : 0u;
      const size_t src = slot * w.kvstride + w.kvh * WG_D + c * 8;
      cp_async16(kb + sw128(r, c, WG_KT), kc + src, ok);
      cp_async16(vb + sw128(r, c, WG_KT), vc + src, ok);
    }
  };

  float o[16][4];
  wg_zero(o);
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const int tok0 = (warp * 16) % w.MT + (lane >> 2);  // token of row g (row g + 8: tok0 + 8)
  const half2 sh2 = __float2half2_rn(scale);
  const uint8_t* const qwg = qs + wgi * 64 * 128;  // this warpgroup's 64 rows

  load(w.t0, 0);
  cp_async_commit();
  for (int kt = w.t0; kt <= w.t1; kt++) {
    const int st = (kt - w.t0) & 1;
    __syncthreads();  // every warp is done with tile kt - 1's stage
    if (kt + 1 <= w.t1) load(kt + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();  // tile kt (and Q) landed for this thread's copies
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // ... and for every thread's
    const uint8_t* kb = kvs + st * 2 * WG_TBYTES;
    float s[16][4];
    wg_issue_qk(s, qwg, kb);
    wg_wait<0>();
    wg_keep_all(s);
    float alpha[2];
    wg_softmax(s, w, kt, tok0, window, sh2, mrow, lrow, alpha);
    wg_rescale(o, alpha);
    uint32_t pa[8][4];
    wg_pack_p(pa, s);
    wg_issue_pv(o, pa, kb + WG_TBYTES);
    wg_wait<0>();
    wg_keep_all(o);
  }
  wg_store_out(out, o, lrow, w, warp);
}

#include "attention_ws.cuh"
