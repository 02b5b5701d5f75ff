// Attention over the paged KV cache, and the cache write.
//
// Cache layout per layer: K and V as f16 rows [num_blocks * block_size,
// kv_heads * D]; a sequence's position p lives in row
// block_table[p / block_size] * block_size + p % block_size.
// Sliding window: query at position i sees keys i - W < j <= i (W = 0: all).
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

#include "mma.cuh"

// Copies n rows of `row` halves (k and v) to their cache slots.
extern "C" __global__ void kv_write(const half* __restrict__ k, const half* __restrict__ v,
                                    half* __restrict__ kc, half* __restrict__ vc,
                                    const int* __restrict__ slots, int n, int row) {
  int vecs = row / 8;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (size_t)n * vecs) return;
  int r = i / vecs, c = i % vecs;
  size_t dst = (size_t)slots[r] * row + c * 8;
  size_t src = (size_t)r * row + c * 8;
  *reinterpret_cast<int4*>(kc + dst) = *reinterpret_cast<const int4*>(k + src);
  *reinterpret_cast<int4*>(vc + dst) = *reinterpret_cast<const int4*>(v + src);
}

// Decode attention: one query token per sequence. Grid (kv_heads, B, P):
// block = G warps, warp h = query head kv*G + h, so the G query heads of a
// KV head read each K/V tile once. Partition p covers keys
// [lo + p*PART, lo + (p+1)*PART) of the sequence's visible range [lo, pos].
// Writes per (b, head, p): running max, sum and the unnormalised f32 output.
#define PART 512
#define TILE 32

template <int D>
__device__ void decode_impl(const half* __restrict__ q, const half* __restrict__ kc,
                            const half* __restrict__ vc, const int* __restrict__ tables,
                            const int* __restrict__ ctx_lens, float* __restrict__ part_o,
                            float* __restrict__ part_ml, int nh, int nkv, int max_blocks,
                            int block_size, int window, float scale, int P) {
  constexpr int KS = D + 8;  // padded row (halves)
  __shared__ __align__(16) half ks[TILE * KS];
  __shared__ __align__(16) half vs[TILE * KS];
  __shared__ float qs[8][D];
  const int kvh = blockIdx.x, b = blockIdx.y, p = blockIdx.z;
  const int G = nh / nkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int head = kvh * G + warp;
  const int pos = ctx_lens[b] - 1;
  const int lo = window > 0 ? max(0, pos - window + 1) : 0;
  const int kstart = lo + p * PART;
  const int kend = min(pos + 1, kstart + PART);
  for (int i = lane; i < D; i += 32) qs[warp][i] = __half2float(q[((size_t)b * nh + head) * D + i]);
  float m = -FLT_MAX, l = 0.f;
  constexpr int DPL = (D + 31) / 32;  // output dims per lane
  float acc[DPL];
#pragma unroll
  for (int i = 0; i < DPL; i++) acc[i] = 0.f;
  const int row = nkv * D;
  const int* table = tables + (size_t)b * max_blocks;
  for (int t0 = kstart; t0 < kend; t0 += TILE) {
    __syncthreads();
    constexpr int VPR = D / 8;
    for (int i = threadIdx.x; i < TILE * VPR; i += blockDim.x) {
      int j = i / VPR, c = i % VPR;
      int kp = t0 + j;
      int4 kv4 = make_int4(0, 0, 0, 0), vv4 = make_int4(0, 0, 0, 0);
      if (kp < kend) {
        size_t slot = (size_t)table[kp / block_size] * block_size + kp % block_size;
        size_t off = slot * row + (size_t)kvh * D + c * 8;
        kv4 = *reinterpret_cast<const int4*>(kc + off);
        vv4 = *reinterpret_cast<const int4*>(vc + off);
      }
      *reinterpret_cast<int4*>(ks + j * KS + c * 8) = kv4;
      *reinterpret_cast<int4*>(vs + j * KS + c * 8) = vv4;
    }
    __syncthreads();
    // lane j scores key t0 + j.
    float s = -FLT_MAX;
    if (t0 + lane < kend) {
      float dot = 0.f;
      const half2* kr = reinterpret_cast<const half2*>(ks + lane * KS);
#pragma unroll
      for (int i = 0; i < D / 2; i++) {
        float2 kf = __half22float2(kr[i]);
        dot += qs[warp][2 * i] * kf.x + qs[warp][2 * i + 1] * kf.y;
      }
      s = dot * scale;
    }
    float tm = s;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, o));
    float mn = fmaxf(m, tm);
    float pj = (t0 + lane < kend) ? __expf(s - mn) : 0.f;
    float corr = __expf(m - mn);
    float ps = pj;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
    l = l * corr + ps;
    m = mn;
#pragma unroll
    for (int i = 0; i < DPL; i++) acc[i] *= corr;
    int nk = min(TILE, kend - t0);
    for (int j = 0; j < nk; j++) {
      float pjj = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
      for (int i = 0; i < DPL; i++) {
        int d = lane + 32 * i;
        if (d < D) acc[i] += pjj * __half2float(vs[j * KS + d]);
      }
    }
  }
  size_t idx = ((size_t)b * nh + head) * P + p;
#pragma unroll
  for (int i = 0; i < DPL; i++) {
    int d = lane + 32 * i;
    if (d < D) part_o[idx * D + d] = acc[i];
  }
  if (lane == 0) {
    part_ml[idx * 2] = kstart < kend ? m : -FLT_MAX;
    part_ml[idx * 2 + 1] = l;
  }
}

#define DECODE(D)                                                                               \
  extern "C" __global__ void paged_decode_d##D(                                                 \
      const half* q, const half* kc, const half* vc, const int* tables, const int* ctx_lens,    \
      float* part_o, float* part_ml, int nh, int nkv, int max_blocks, int block_size,           \
      int window, float scale, int P) {                                                         \
    decode_impl<D>(q, kc, vc, tables, ctx_lens, part_o, part_ml, nh, nkv, max_blocks,          \
                   block_size, window, scale, P);                                               \
  }
DECODE(16)
DECODE(32)
DECODE(64)
DECODE(128)

// Combines the partitions: grid (B * nh), block D threads (D <= 1024).
extern "C" __global__ void paged_decode_combine(const float* __restrict__ part_o,
                                                const float* __restrict__ part_ml,
                                                half* __restrict__ out, int D, int P) {
  size_t bh = blockIdx.x;
  int d = threadIdx.x;
  if (d >= D) return;
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
  out[bh * D + d] = __float2half(l > 0.f ? o / l : 0.f);
}

// Prefill attention over the paged cache, flash style (never materializes
// the scores), head dims 16/32/64/128 (D): one block = 4 warps = 64 query
// rows of one query head; each
// warp owns 16 rows. Key tiles of 64 (K and V rows gathered from the cache
// through the chunk's slot list) are double-buffered in shared memory with
// cp.async. Per tile: S = Q K^T on tensor cores (mma m16n8k16, f32
// accumulate), rounded as HF's eager f16 arithmetic rounds it (the f16
// product times the f16 scale), causal + sliding-window mask, online
// softmax in f32 (running max and sum per row), P rounded to f16 and
// O += P V on tensor cores; O / l at the end. HF eager normalizes P before
// rounding it, so results differ from it by f16 rounding only.
//
// tiles[i] = (first row of the tile in q/out, rows (<= 64), position of
// the first row, offset of the chunk's slot list in `keys`); keys[off + j]
// is the cache row of position j of that chunk's sequence.
#define FP_KT 64

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  int bytes = valid ? 16 : 0;  // 0: zero-fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(uint32_t* r, const void* p) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x2(uint32_t* r, const void* p) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, const void* p) {
  unsigned s = (unsigned)__cvta_generic_to_shared(p);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ uint32_t pack_h2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <int FP_D>
__device__ void flash_prefill_impl(const half* __restrict__ q, const half* __restrict__ kc,
                                   const half* __restrict__ vc, const unsigned* __restrict__ keys,
                                   const int4* __restrict__ tiles, half* __restrict__ out,
                                   int heads, int kv_heads, int window, float scale) {
  constexpr int FP_RS = FP_D + 8;  // smem row stride in halves (no bank conflicts at 128)
  constexpr int KS = FP_D / 16;    // k-steps of Q K^T
  constexpr int DN = FP_D / 8;     // n-tiles of P V
  extern __shared__ __align__(16) half smem[];  // [2 stages][K, V][64][FP_RS]
  const int4 tile = tiles[blockIdx.x];
  const int row0 = tile.x, rows = tile.y, pos0 = tile.z, koff = tile.w;
  const int h = blockIdx.y, kvh = h / (heads / kv_heads);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const size_t qstride = (size_t)heads * FP_D, kvstride = (size_t)kv_heads * FP_D;

  // Q fragments of this warp's 16 rows (A operand, 8 k-steps over d).
  uint32_t qa[KS][4];
  {
    const int ra = warp * 16 + g, rb = ra + 8;
    const half* qa_row = q + (size_t)(row0 + ra) * qstride + h * FP_D;
    const half* qb_row = q + (size_t)(row0 + rb) * qstride + h * FP_D;
#pragma unroll
    for (int s = 0; s < KS; s++) {
      const int c0 = s * 16 + 2 * t;
      qa[s][0] = ra < rows ? *reinterpret_cast<const uint32_t*>(qa_row + c0) : 0u;
      qa[s][1] = rb < rows ? *reinterpret_cast<const uint32_t*>(qb_row + c0) : 0u;
      qa[s][2] = ra < rows ? *reinterpret_cast<const uint32_t*>(qa_row + c0 + 8) : 0u;
      qa[s][3] = rb < rows ? *reinterpret_cast<const uint32_t*>(qb_row + c0 + 8) : 0u;
    }
  }
  const int kmax = pos0 + rows - 1;  // last visible key of the tile
  const int kmin = window > 0 ? max(0, pos0 - window + 1) : 0;
  const int t0 = kmin / FP_KT, t1 = kmax / FP_KT;  // key tiles, inclusive

  // Loads key tile `kt` into stage `st`: 64 rows x D/8 int4 per matrix.
  auto load = [&](int kt, int st) {
    half* ks = smem + st * 2 * FP_KT * FP_RS;
    half* vs = ks + FP_KT * FP_RS;
#pragma unroll
    for (int i = 0; i < FP_D / 16; i++) {
      const int idx = threadIdx.x + i * 128;
      const int r = idx / DN, c = (idx % DN) * 8;
      const int j = kt * FP_KT + r;
      const bool ok = j <= kmax;
      const size_t slot = ok ? keys[koff + j] : 0;
      cp_async16(ks + r * FP_RS + c, kc + slot * kvstride + kvh * FP_D + c, ok);
      cp_async16(vs + r * FP_RS + c, vc + slot * kvstride + kvh * FP_D + c, ok);
    }
  };

  float o[DN][4];
#pragma unroll
  for (int i = 0; i < DN; i++)
#pragma unroll
    for (int r = 0; r < 4; r++) o[i][r] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const half sh = __float2half(scale);
  const int qpos[2] = {pos0 + warp * 16 + g, pos0 + warp * 16 + g + 8};
  const bool qok[2] = {warp * 16 + g < rows, warp * 16 + g + 8 < rows};

  load(t0, 0);
  cp_async_commit();
  for (int kt = t0; kt <= t1; kt++) {
    const int st = (kt - t0) & 1;
    if (kt < t1) {
      load(kt + 1, st ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const half* ks = smem + st * 2 * FP_KT * FP_RS;
    const half* vs = ks + FP_KT * FP_RS;

    // S = Q K^T: 8 n-tiles of 8 keys.
    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) s[j][r] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      if (KS == 1) {
        uint32_t b[2];  // m0/m1: keys j*8.., d 0 (+8)
        ldsm_x2(b, ks + (j * 8 + (lane & 7)) * FP_RS + ((lane >> 3) & 1) * 8);
        mma_16816(s[j], qa[0], b[0], b[1]);
      } else {
#pragma unroll
        for (int s2 = 0; s2 < KS; s2 += 2) {
          // m0/m1: keys j*8.., d 16*s2 (+8); m2/m3: d 16*(s2+1) (+8).
          uint32_t b[4];
          const int l = lane;
          ldsm_x4(b, ks + (j * 8 + (l & 7)) * FP_RS + s2 * 16 + ((l >> 3) & 1) * 8 + (l >> 4) * 16);
          mma_16816(s[j], qa[s2], b[0], b[1]);
          mma_16816(s[j], qa[s2 + 1], b[2], b[3]);
        }
      }
    }
    // Round as HF (f16 product times f16 scale), mask, online softmax.
    float mx[2] = {mrow[0], mrow[1]};
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const int hr = r >> 1;
        const int kp = kt * FP_KT + j * 8 + 2 * t + (r & 1);
        const bool vis = qok[hr] && kp <= qpos[hr] && (window <= 0 || kp > qpos[hr] - window);
        const float v = __half2float(__hmul(__float2half(s[j][r]), sh));
        s[j][r] = vis ? v : -INFINITY;
        mx[hr] = fmaxf(mx[hr], s[j][r]);
      }
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
      mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
    }
    float alpha[2], base[2];
#pragma unroll
    for (int hr = 0; hr < 2; hr++) {
      base[hr] = mx[hr] == -INFINITY ? 0.f : mx[hr];
      alpha[hr] = mrow[hr] == -INFINITY ? 0.f : expf(mrow[hr] - base[hr]);
      mrow[hr] = mx[hr];
      lrow[hr] *= alpha[hr];
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int r = 0; r < 4; r++) {
        const float p = expf(s[j][r] - base[r >> 1]);  // exp(-inf) = 0
        s[j][r] = p;
        lrow[r >> 1] += p;
      }
#pragma unroll
    for (int i = 0; i < DN; i++) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // O += P V: 4 k-steps of 16 keys, D/8 n-tiles of 8 dims.
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
      uint32_t pa[4] = {pack_h2(s[2 * kk][0], s[2 * kk][1]), pack_h2(s[2 * kk][2], s[2 * kk][3]),
                        pack_h2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        pack_h2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < DN; dn += 2) {
        // m0/m1: keys 16kk (+8), dims dn*8; m2/m3: dims (dn+1)*8.
        uint32_t b[4];
        ldsm_x4_t(b, vs + (kk * 16 + (lane & 15)) * FP_RS + dn * 8 + (lane >> 4) * 8);
        mma_16816(o[dn], pa, b[0], b[1]);
        mma_16816(o[dn + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    lrow[hr] += __shfl_xor_sync(0xffffffffu, lrow[hr], 1);
    lrow[hr] += __shfl_xor_sync(0xffffffffu, lrow[hr], 2);
  }
#pragma unroll
  for (int hr = 0; hr < 2; hr++) {
    const int r = warp * 16 + g + hr * 8;
    if (r >= rows) continue;
    const float inv = lrow[hr] > 0.f ? 1.f / lrow[hr] : 0.f;
    half* dst = out + (size_t)(row0 + r) * qstride + h * FP_D + 2 * t;
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
      *reinterpret_cast<half2*>(dst + dn * 8) =
          __floats2half2_rn(o[dn][2 * hr] * inv, o[dn][2 * hr + 1] * inv);
  }
}

#define FLASH_PREFILL(D)                                                                         \
  extern "C" __global__ void __launch_bounds__(128) flash_prefill_d##D(                         \
      const half* q, const half* kc, const half* vc, const unsigned* keys, const int4* tiles,   \
      half* out, int heads, int kv_heads, int window, float scale) {                            \
    flash_prefill_impl<D>(q, kc, vc, keys, tiles, out, heads, kv_heads, window, scale);         \
  }
FLASH_PREFILL(16)
FLASH_PREFILL(32)
FLASH_PREFILL(64)
FLASH_PREFILL(128)
