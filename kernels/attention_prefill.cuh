// Flash prefill attention over the paged KV cache (included by
// attention.cu, after its helpers).
#pragma once

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
