// Attention over the paged KV cache, and the cache write.
//
// Cache layout per layer: K and V as f16 rows [num_blocks * block_size,
// kv_heads * D]; a sequence's position p lives in row
// block_table[p / block_size] * block_size + p % block_size.
// Sliding window: query at position i sees keys i - W < j <= i (W = 0: all).
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

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

// Prefill scores -> probabilities, as HF eager attention in f16: the raw f16
// q.k^T times the f16 scale (rounded), the causal + window mask, softmax in
// f32, rounded to f16. scores [R, L] with row r a query at position
// start + (r % n); one block per row.
extern "C" __global__ void masked_softmax(half* __restrict__ scores, int L, int n, int start,
                                          int window, float scale) {
  __shared__ float red[32];
  size_t r = blockIdx.x;
  half* s = scores + r * L;
  int i = start + (int)(r % n);
  int lo = window > 0 ? max(0, i - window + 1) : 0;
  half sh = __float2half(scale);
  float mx = -FLT_MAX;
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (j >= lo && j <= i) mx = fmaxf(mx, __half2float(__hmul(s[j], sh)));
  int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red[w] = mx;
  __syncthreads();
  mx = -FLT_MAX;
  for (int k = 0; k < nw; k++) mx = fmaxf(mx, red[k]);
  __syncthreads();
  float sum = 0.f;
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (j >= lo && j <= i) sum += expf(__half2float(__hmul(s[j], sh)) - mx);
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) red[w] = sum;
  __syncthreads();
  sum = 0.f;
  for (int k = 0; k < nw; k++) sum += red[k];
  float inv = 1.f / sum;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    float pj = (j >= lo && j <= i) ? expf(__half2float(__hmul(s[j], sh)) - mx) * inv : 0.f;
    s[j] = __float2half(pj);
  }
}
