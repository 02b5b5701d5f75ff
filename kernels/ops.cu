// Fused small ops, in HF's f16 order of roundings, and random fills for
// dummy weights.
#include <cuda_fp16.h>
#include <stdint.h>

// Eight halves as one 16-byte access.
union H8 {
  int4 v;
  half h[8];
};

// Vectors of eight halves of a row that each thread of rmsnorm_add keeps
// in registers on its vector path (H <= 8 * NORM_RV * blockDim.x).
#define NORM_RV 8

// One block per row of H. With `add` non-null: res = x + add (f16, as HF's
// residual add), written to res_out; then out = w * f16(r * rsqrt(mean(r^2) + eps))
// with the mean in f32. vec: H % 8 == 0, H / 8 <= NORM_RV * blockDim.x and
// every pointer 16-byte aligned: each thread moves eight halves per access
// and keeps its part of the row (and of w) in registers across the mean.
// RV: the vectors a thread keeps (the rmsnorm_add_r1 build: one, with a
// thread per vector of the row, so that all of a row's loads are in flight
// at once and a thread needs few registers).
template <int RV>
__device__ __forceinline__ void rmsnorm_add_impl(const half* __restrict__ x,
                                                 const half* __restrict__ add,
                                                 const half* __restrict__ w, half* __restrict__ out,
                                                 half* __restrict__ res_out, int H, float eps,
                                                 int vec) {
  __shared__ float red[32];
  size_t base = (size_t)blockIdx.x * H;
  float ss = 0.f;
  H8 r[RV], wv[RV];
  if (vec) {
    const int nv = H / 8;
#pragma unroll
    for (int k = 0; k < RV; k++) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i >= nv) break;
      r[k].v = reinterpret_cast<const int4*>(x + base)[i];
      wv[k].v = reinterpret_cast<const int4*>(w)[i];
      if (add != nullptr) {
        H8 a;
        a.v = reinterpret_cast<const int4*>(add + base)[i];
#pragma unroll
        for (int j = 0; j < 8; j++) r[k].h[j] = __hadd(r[k].h[j], a.h[j]);
        reinterpret_cast<int4*>(res_out + base)[i] = r[k].v;
      }
#pragma unroll
      for (int j = 0; j < 8; j++) {
        float f = __half2float(r[k].h[j]);
        ss += f * f;
      }
    }
  } else {
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
      half rr = x[base + i];
      if (add != nullptr) {
        rr = __hadd(rr, add[base + i]);
        res_out[base + i] = rr;
      }
      float f = __half2float(rr);
      ss += f * f;
    }
  }
  int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if (lane == 0) red[wp] = ss;
  __syncthreads();
  ss = 0.f;
  for (int k = 0; k < nw; k++) ss += red[k];
  float inv = rsqrtf(ss / H + eps);
  if (vec) {
    const int nv = H / 8;
#pragma unroll
    for (int k = 0; k < RV; k++) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i >= nv) break;
      H8 o;
#pragma unroll
      for (int j = 0; j < 8; j++)
        o.h[j] = __hmul(wv[k].h[j], __float2half(__half2float(r[k].h[j]) * inv));
      reinterpret_cast<int4*>(out + base)[i] = o.v;
    }
  } else {
    const half* src = add != nullptr ? res_out : x;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
      half nrm = __float2half(__half2float(src[base + i]) * inv);
      out[base + i] = __hmul(w[i], nrm);
    }
  }
}

extern "C" __global__ void rmsnorm_add(const half* __restrict__ x, const half* __restrict__ add,
                                       const half* __restrict__ w, half* __restrict__ out,
                                       half* __restrict__ res_out, int H, float eps, int vec) {
  rmsnorm_add_impl<NORM_RV>(x, add, w, out, res_out, H, eps, vec);
}

extern "C" __global__ void __launch_bounds__(1024)
    rmsnorm_add_r1(const half* __restrict__ x, const half* __restrict__ add,
                   const half* __restrict__ w, half* __restrict__ out, half* __restrict__ res_out,
                   int H, float eps, int vec) {
  rmsnorm_add_impl<1>(x, add, w, out, res_out, H, eps, vec);
}

__device__ __forceinline__ half silu_mul1(half gate, half up) {
  float g = __half2float(gate);
  half s = __float2half(g / (1.f + expf(-g)));
  return __hmul(s, up);
}

// out [rows, width] = f16(silu(gate)) * up, rounded as torch does in f16;
// gate and up rows are gs and us halves apart (column slices of one fused
// gate/up output are read in place). vec: width and strides multiples of 8
// and the pointers 16-byte aligned; a thread then does 8 elements.
extern "C" __global__ void silu_mul(const half* __restrict__ gate, const half* __restrict__ up,
                                    half* __restrict__ out, int rows, int width, int gs, int us,
                                    int vec) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (vec) {
    const int vecs = width / 8;
    if (i >= (size_t)rows * vecs) return;
    const size_t r = i / vecs, c = (i % vecs) * 8;
    H8 g, u, o;
    g.v = *reinterpret_cast<const int4*>(gate + r * gs + c);
    u.v = *reinterpret_cast<const int4*>(up + r * us + c);
#pragma unroll
    for (int j = 0; j < 8; j++) o.h[j] = silu_mul1(g.h[j], u.h[j]);
    *reinterpret_cast<int4*>(out + r * width + c) = o.v;
  } else {
    if (i >= (size_t)rows * width) return;
    const size_t r = i / width, c = i % width;
    out[i] = silu_mul1(gate[r * gs + c], up[r * us + c]);
  }
}

__device__ __forceinline__ uint32_t mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return (uint32_t)((z ^ (z >> 31)) >> 32);
}

// Random 32-bit words (packed quantized weights).
extern "C" __global__ void fill_u32(uint32_t* out, size_t n, uint64_t seed) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = mix(seed * 0x100000001b3ull + i);
}

// Uniform f16 in [lo, hi).
extern "C" __global__ void fill_f16(half* out, size_t n, uint64_t seed, float lo, float hi) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2half(lo + (hi - lo) * (mix(seed * 0x100000001b3ull + i) * 2.3283064e-10f));
}

// Dummy GPTQ group parameters: half2(scale, 1024 + zero), scale uniform in
// [0.002, 0.02), zero uniform in [1, 2^bits] (AutoGPTQ v1 zeros are stored - 1).
extern "C" __global__ void fill_sz(half2* out, size_t n, uint64_t seed, int bits, float lo,
                                   float span) {
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  uint32_t a = mix(seed * 0x100000001b3ull + 2 * i), b = mix(seed * 0x100000001b3ull + 2 * i + 1);
  float s = lo + span * (a * 2.3283064e-10f);
  int z = 1 + (int)(b % (1u << bits));
  out[i] = __halves2half2(__float2half(s), __float2half(1024.f + z));
}

__device__ __forceinline__ void rope1(half x1, half x2, half c, half s, half* o1, half* o2) {
  *o1 = __hadd_rn(__hmul_rn(x1, c), __hmul_rn(__hneg(x2), s));
  *o2 = __hadd_rn(__hmul_rn(x2, c), __hmul_rn(x1, s));
}

// Rotates the 8 pairs (j .. j+7, j+half_d .. j+half_d+7) of one head row
// src into dst, with cos/sin from table offset cs: 16-byte accesses.
__device__ __forceinline__ void rope8(const half* src, half* dst, const half* cos, const half* sin,
                                      size_t cs, int j, int half_d) {
  H8 x1, x2, c, s, o1, o2;
  x1.v = *reinterpret_cast<const int4*>(src + j);
  x2.v = *reinterpret_cast<const int4*>(src + j + half_d);
  c.v = *reinterpret_cast<const int4*>(cos + cs);
  s.v = *reinterpret_cast<const int4*>(sin + cs);
#pragma unroll
  for (int e = 0; e < 8; e++) rope1(x1.h[e], x2.h[e], c.h[e], s.h[e], &o1.h[e], &o2.h[e]);
  *reinterpret_cast<int4*>(dst + j) = o1.v;
  *reinterpret_cast<int4*>(dst + j + half_d) = o2.v;
}

// This thread's token t, head h and first pair j when each of T tokens has
// `heads` heads of per_h threads, `step` pairs each; false past the end.
__device__ __forceinline__ bool rope_slot(int T, int heads, int per_h, int step, int* t, int* h,
                                          int* j) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t per_t = (size_t)heads * per_h;
  if (i >= (size_t)T * per_t) return false;
  *t = i / per_t;
  const int r = i % per_t;
  *h = r / per_h;
  *j = (r % per_h) * step;
  return true;
}

// Source and destination rows of head h of token t: q heads first (rows
// qs halves apart, to the dense qo), then k heads (ks apart, to the row of
// head h - nq from kdst, the token's first k row out).
__device__ __forceinline__ void qk_rows(const half* q, const half* k, half* qo, half* kdst, int t,
                                        int h, int nq, int qs, int ks, int D, const half** src,
                                        half** dst) {
  if (h < nq) {
    *src = q + (size_t)t * qs + (size_t)h * D;
    *dst = qo + ((size_t)t * nq + h) * D;
  } else {
    *src = k + (size_t)t * ks + (size_t)(h - nq) * D;
    *dst = kdst + (size_t)(h - nq) * D;
  }
}

// Rotate-half RoPE on q [T, nq*D] and k [T, nk*D] for token positions pos[T],
// in HF's f16 order: out1 = x1*c + (-x2)*s, out2 = x2*c + x1*s, each product
// and the sum rounded to f16. cos/sin: [positions, D/2] tables. q and k
// rows are qs and ks halves apart (column slices of a fused q/k/v output
// are read in place); qo and ko are dense. vec (D % 16 == 0, strides
// multiples of 8, pointers 16-byte aligned): a thread rotates 8 pairs.
extern "C" __global__ void rope_qk(const half* __restrict__ q, const half* __restrict__ k,
                                   const half* __restrict__ cos, const half* __restrict__ sin,
                                   const unsigned* __restrict__ pos, half* __restrict__ qo,
                                   half* __restrict__ ko, int T, int nq, int nk, int D, int qs,
                                   int ks, int vec) {
  const int half_d = D / 2;
  const int step = vec ? 8 : 1;  // pairs per thread
  int t, h, j;
  if (!rope_slot(T, nq + nk, half_d / step, step, &t, &h, &j)) return;
  const half* src;
  half* dst;
  qk_rows(q, k, qo, ko + (size_t)t * nk * D, t, h, nq, qs, ks, D, &src, &dst);
  const size_t cs = (size_t)pos[t] * half_d + j;
  if (vec) {
    rope8(src, dst, cos, sin, cs, j, half_d);
  } else {
    rope1(src[j], src[j + half_d], cos[cs], sin[cs], dst + j, dst + j + half_d);
  }
}

// rope_qk's rotation with the cache write fused: q goes to the dense qo,
// the rotated k rows straight to their cache rows (kc row slots[t], kv
// heads nk of D), and the v rows (vs halves apart) are copied to vc. The
// vector path only (the caller checks D % 16, strides and alignment): a
// thread does 8 pairs of one (token, head); heads are nq q, nk k, nk v.
extern "C" __global__ void rope_qkv_cache(const half* __restrict__ q, const half* __restrict__ k,
                                          const half* __restrict__ v, const half* __restrict__ cos,
                                          const half* __restrict__ sin,
                                          const unsigned* __restrict__ pos,
                                          const unsigned* __restrict__ slots, half* __restrict__ qo,
                                          half* __restrict__ kc, half* __restrict__ vc, int T,
                                          int nq, int nk, int D, int qs, int ks, int vs) {
  const int half_d = D / 2;
  int t, h, j;
  if (!rope_slot(T, nq + 2 * nk, half_d / 8, 8, &t, &h, &j)) return;
  const size_t row = (size_t)slots[t] * nk * D;  // the token's cache row
  if (h >= nq + nk) {
    const int hv = h - nq - nk;
    const half* src = v + (size_t)t * vs + (size_t)hv * D;
    half* dst = vc + row + (size_t)hv * D;
    *reinterpret_cast<int4*>(dst + j) = *reinterpret_cast<const int4*>(src + j);
    *reinterpret_cast<int4*>(dst + j + half_d) = *reinterpret_cast<const int4*>(src + j + half_d);
    return;
  }
  const half* src;
  half* dst;
  qk_rows(q, k, qo, kc + row, t, h, nq, qs, ks, D, &src, &dst);
  rope8(src, dst, cos, sin, (size_t)pos[t] * half_d + j, j, half_d);
}

// Top-k candidates of each row of f32 logits, in the host sampler's order:
// value v / t descending (f32 total order: -0 below +0), ties by lower
// token id; non-finite values skipped. One block of 1024 threads per row,
// k <= 1024, O(V) per row whatever k:
//  1. radix select of the k-th largest key (the order-preserving u32 of
//     v / t), 8 bits per pass from the top: a histogram of the next digit
//     among the keys that match the digits chosen so far (warp-aggregated
//     shared atomics), then the digit whose bucket holds the k-th;
//  2. every key above it, and of the keys equal to it the lowest ids (each
//     thread walks 32 consecutive ids; a block scan ranks the ties in id
//     order), into shared memory;
//  3. a bitonic sort of those k in the host's order.
// ids/vals [rows, k]; a row with fewer than k finite values pads with id
// 0xffffffff and -inf.
#define TOPK_THREADS 1024
#define TOPK_MAX 1024

__device__ __forceinline__ bool topk_key(const float* row, int i, int V, float t, unsigned* key) {
  if (i >= V) return false;
  const float v = row[i];
  if (!isfinite(v)) return false;
  const unsigned u = __float_as_uint(v / t);
  *key = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return true;
}

// Exclusive prefix sum of x over the block (1024 threads); total in *total.
__device__ unsigned block_scan(unsigned x, unsigned* warp_sums, unsigned* total) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  unsigned inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += y;
  }
  if (lane == 31) warp_sums[w] = inc;
  __syncthreads();
  if (w == 0) {
    unsigned ws = warp_sums[lane], wi = ws;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned y = __shfl_up_sync(0xffffffffu, wi, o);
      if (lane >= o) wi += y;
    }
    warp_sums[lane] = wi - ws;  // exclusive
    if (lane == 31) *total = wi;
  }
  __syncthreads();
  const unsigned r = warp_sums[w] + inc - x;
  __syncthreads();  // warp_sums is reused by the next call
  return r;
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
    topk_rows(const float* __restrict__ logits, const float* __restrict__ temps,
              unsigned* __restrict__ ids, float* __restrict__ vals, int V, int k) {
  __shared__ unsigned hist[256];
  __shared__ unsigned warp_sums[32];
  __shared__ unsigned ckey[TOPK_MAX], cid[TOPK_MAX];
  __shared__ unsigned s_prefix, s_mask, s_need, s_total, s_count, s_ties;
  const float* row = logits + (size_t)blockIdx.x * V;
  const float t = temps[blockIdx.x];
  const int tid = threadIdx.x, lane = tid & 31;
  const int span = (V + TOPK_THREADS - 1) / TOPK_THREADS * TOPK_THREADS;  // whole warps
  if (tid == 0) {
    s_prefix = 0u;
    s_mask = 0u;
    s_need = (unsigned)k;  // keys still to take at or below the chosen prefix
  }
  // 1. Radix select.
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += TOPK_THREADS) hist[i] = 0u;
    __syncthreads();
    const unsigned prefix = s_prefix, mask = s_mask;
    for (int i = tid; i < span; i += TOPK_THREADS) {
      unsigned key;
      const bool in = topk_key(row, i, V, t, &key) && (key & mask) == prefix;
      const unsigned bucket = in ? (key >> shift) & 255u : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bucket);
      if (in && lane == __ffs(peers) - 1) atomicAdd(&hist[bucket], __popc(peers));
    }
    __syncthreads();
    if (tid == 0) {
      unsigned need = s_need, cum = 0;
      if (shift == 24) {
        unsigned total = 0;
        for (int b = 0; b < 256; b++) total += hist[b];
        s_total = total;
        if (total < need) need = total;  // fewer finite keys than k: take them all
        s_need = need;
      }
      int b = 255;
      for (; b > 0; b--) {
        if (cum + hist[b] >= need) break;
        cum += hist[b];
      }
      s_need = need - cum;  // of bucket b's keys
      s_prefix = prefix | ((unsigned)b << shift);
      s_mask = mask | (255u << shift);
    }
    __syncthreads();
  }
  const unsigned T = s_prefix, take_ties = s_need;
  const unsigned n = min((unsigned)k, s_total);
  // 2. Gather: keys above T in any order, then the ties in id order.
  const int per = (V + TOPK_THREADS - 1) / TOPK_THREADS;
  const int lo = tid * per, hi = min(V, lo + per);
  unsigned above = 0, ties = 0;
  for (int i = lo; i < hi; i++) {
    unsigned key;
    if (topk_key(row, i, V, t, &key)) {
      above += key > T;
      ties += key == T;
    }
  }
  const unsigned a0 = block_scan(above, warp_sums, &s_count);
  const unsigned t0 = block_scan(ties, warp_sums, &s_ties);
  const unsigned n_above = s_count;
  unsigned ra = a0, rt = t0;
  if (n > 0) {
    for (int i = lo; i < hi; i++) {
      unsigned key;
      if (!topk_key(row, i, V, t, &key)) continue;
      if (key > T) {
        ckey[ra] = key;
        cid[ra] = i;
        ra++;
      } else if (key == T && rt < take_ties) {
        ckey[n_above + rt] = key;
        cid[n_above + rt] = i;
        rt++;
      }
    }
  }
  __syncthreads();
  // 3. Bitonic sort of the n candidates (padded to a power of two with
  // keys below every finite one), largest key first, ties by lower id.
  int P = 1;
  while (P < (int)n) P <<= 1;
  for (int i = n + tid; i < P; i += TOPK_THREADS) {
    ckey[i] = 0u;
    cid[i] = 0xffffffffu;
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = tid; i < P; i += TOPK_THREADS) {
        const int j = i ^ stride;
        if (j > i) {
          // "first" = i comes before j in the host's order.
          const bool first = ckey[i] > ckey[j] || (ckey[i] == ckey[j] && cid[i] < cid[j]);
          const bool down = (i & size) == 0;  // this run in the host's order
          if (first != down) {
            const unsigned kk = ckey[i], ii = cid[i];
            ckey[i] = ckey[j];
            cid[i] = cid[j];
            ckey[j] = kk;
            cid[j] = ii;
          }
        }
      }
      __syncthreads();
    }
  }
  unsigned* oid = ids + (size_t)blockIdx.x * k;
  float* oval = vals + (size_t)blockIdx.x * k;
  for (int r = tid; r < k; r += TOPK_THREADS) {
    if (r < (int)n) {
      const unsigned key = ckey[r];
      const unsigned u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
      oid[r] = cid[r];
      oval[r] = __uint_as_float(u);
    } else {
      oid[r] = 0xffffffffu;
      oval[r] = -INFINITY;
    }
  }
}

// Reads n int4 (a bandwidth ceiling for the read-bound kernels): each
// thread keeps four loads in flight; the XOR only keeps them from being
// optimised away (out is written only if it hits a fixed value).
extern "C" __global__ void read_sum(const int4* __restrict__ x, size_t n, unsigned* __restrict__ out) {
  unsigned acc = 0;
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    int4 a = x[i], b = x[i + stride], c = x[i + 2 * stride], d = x[i + 3 * stride];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
           d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    int4 a = x[i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) out[0] = acc;
}

// HF's repetition penalty in place on f32 rows [R, V]: listed token ids[i]
// of row row_of[i] becomes l < 0 ? l * p : l / p (p = pen[row]). The host
// lists each token at most once per row, so no two threads touch one value.
extern "C" __global__ void penalize_rows(float* __restrict__ rows, const unsigned* __restrict__ ids,
                                         const unsigned* __restrict__ row_of,
                                         const float* __restrict__ pen, int n, int V) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n || ids[i] >= (unsigned)V) return;
  float* l = rows + (size_t)row_of[i] * V + ids[i];
  const float p = pen[row_of[i]];
  *l = *l < 0.f ? *l * p : *l / p;
}

// Block-wide reductions of one value per thread (blockDim.x a multiple of
// 32, at most 1024); every thread gets the result.
__device__ float block_max(float v, float* sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int w = 0; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, sh[w]);
  __syncthreads();
  return m;
}

// Per row of f32 logits [R, V] at temperature temps[r], as the host sampler
// computes them: max = the largest finite v / t, and the f64 sum of
// exp(f64(v / t - max)) over the finite values (norms[r] = {max, sum}).
// draw_rows also draws: with u = us[r], the first token (in id order) at
// which the running sum passes u * sum (ids[r]; 0xffffffff: no finite
// value). Each thread sums a contiguous run of ids in order, the runs are
// prefixed in thread order, and the run holding the target walks it, so
// the draw differs from the host's one sequential sum by rounding only.
__device__ void row_stats(const float* row, float t, int V, int per, float* shf, double* shd,
                          float* max_out, double* local_out, double* before_out, double* total_out) {
  const int lo = threadIdx.x * per, hi = min(V, lo + per);
  float m = -INFINITY;
  for (int i = lo; i < hi; i++)
    if (isfinite(row[i])) m = fmaxf(m, row[i] / t);
  m = block_max(m, shf);
  double s = 0.0;
  if (m != -INFINITY)
    for (int i = lo; i < hi; i++)
      if (isfinite(row[i])) s += exp((double)(row[i] / t - m));
  shd[threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix in thread order, then the total
    double acc = 0.0;
    for (int k = 0; k < (int)blockDim.x; k++) {
      const double x = shd[k];
      shd[k] = acc;
      acc += x;
    }
    shd[blockDim.x] = acc;
  }
  __syncthreads();
  *max_out = m;
  *local_out = s;
  *before_out = shd[threadIdx.x];
  *total_out = shd[blockDim.x];
  __syncthreads();
}

extern "C" __global__ void row_norms(const float* __restrict__ rows, const float* __restrict__ temps,
                                     float* __restrict__ maxes, double* __restrict__ sums, int V) {
  __shared__ float shf[32];
  __shared__ double shd[1025];
  const int per = (V + blockDim.x - 1) / blockDim.x;
  float m;
  double local, before, total;
  row_stats(rows + (size_t)blockIdx.x * V, temps[blockIdx.x], V, per, shf, shd, &m, &local, &before,
            &total);
  if (threadIdx.x == 0) {
    maxes[blockIdx.x] = m;
    sums[blockIdx.x] = total;
  }
}

extern "C" __global__ void draw_rows(const float* __restrict__ rows, const float* __restrict__ temps,
                                     const double* __restrict__ us, unsigned* __restrict__ ids, int V) {
  __shared__ float shf[32];
  __shared__ double shd[1025];
  __shared__ unsigned found, last;
  const float* row = rows + (size_t)blockIdx.x * V;
  const float t = temps[blockIdx.x];
  const int per = (V + blockDim.x - 1) / blockDim.x;
  float m;
  double local, before, total;
  if (threadIdx.x == 0) {
    found = 0xffffffffu;
    last = 0xffffffffu;
  }
  row_stats(row, t, V, per, shf, shd, &m, &local, &before, &total);
  const int lo = threadIdx.x * per, hi = min(V, lo + per);
  if (m != -INFINITY) {
    const double target = us[blockIdx.x] * total;
    int last_here = -1;
    for (int i = lo; i < hi; i++)
      if (isfinite(row[i])) last_here = i;
    if (last_here >= 0) atomicMax(reinterpret_cast<int*>(&last), last_here);  // ids < 2^31
    if (target < before + local) {
      double acc = before;
      for (int i = lo; i < hi; i++) {
        if (!isfinite(row[i])) continue;
        acc += exp((double)(row[i] / t - m));
        if (target < acc) {
          atomicMin(&found, (unsigned)i);
          break;
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) ids[blockIdx.x] = found != 0xffffffffu ? found : last;
}
