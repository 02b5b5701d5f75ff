// The warp-specialized wgmma flash prefill (kernels/WGMMA-PREFILL-PLAN.md,
// steps 3-5), included by attention_wg.cu after the plain kernel whose
// pieces it shares: the same arithmetic in the same order, so the same
// bits. 384 threads: warpgroups 0 and 1 compute (64 rows each, 232
// registers), warpgroup 2 gathers Q once and the K and V tiles into
// S stages (2 or 3) through cp.async, each stage's arrival counted on a
// "full" mbarrier and its release on an "empty" one. A consumer issues
// S_n = Q K_n^T and O += P_{n-1} V_{n-1} together, runs tile n's softmax
// while the second product is on the tensor cores, then rescales O; the
// two consumers take turns issuing (named barriers 1 and 2), so one's
// softmax runs under the other's products.
#pragma once
#include "sm90.cuh"

// The producer: Q, then the key tiles t0..t1, K and V of tile n in stage n
// % S once the consumers released it. Warp pw gathers rows 32pw..
// 32pw+31 of a tile, a half-warp per 256-byte row (lane l holds the slot of
// row 32pw + l); zeros past kmax (V must be finite there).
template <int S>
__device__ __forceinline__ void ws_produce(uint8_t* qs, uint8_t* ks, uint8_t* vs, uint64_t* bars,
                                           const half* q, const half* kc, const half* vc,
                                           const unsigned* keys, const WgTile& w) {
  uint64_t *fullq = bars, *fullk = bars + 1, *fullv = fullk + S;
  uint64_t *emptyk = fullv + S, *emptyv = emptyk + S;
  const int ptid = threadIdx.x - 256, pw = ptid >> 5, lane = threadIdx.x & 31;
  for (int i = ptid; i < WG_ROWS * 16; i += 128) wg_load_q(qs, q, w, i);
  cp_async_mbar_arrive(fullq);
  const int c = lane & 15, half_row = lane >> 4;
  for (int kt = w.t0, n = 0; kt <= w.t1; kt++, n++) {
    const int st = n % S;
    const uint32_t par = ((n / S) & 1) ^ 1;  // the previous use's release
    const int j = kt * WG_KT + 32 * pw + lane;
    const unsigned slot = j <= w.kmax ? __ldg(keys + w.koff + j) : 0u;
    const half* srcs[2] = {kc, vc};
    uint8_t* dsts[2] = {ks + st * WG_TBYTES, vs + st * WG_TBYTES};
    uint64_t* empties[2] = {emptyk + st, emptyv + st};
    uint64_t* fulls[2] = {fullk + st, fullv + st};
#pragma unroll
    for (int m = 0; m < 2; m++) {
      mbar_wait(empties[m], par);
#pragma unroll 4
      for (int i = 0; i < 16; i++) {
        const int rr = 2 * i + half_row, r = 32 * pw + rr;
        const size_t sl = __shfl_sync(0xffffffffu, slot, rr);
        const bool ok = kt * WG_KT + r <= w.kmax;
        cp_async16(dsts[m] + sw128(r, c, WG_KT),
                   srcs[m] + sl * w.kvstride + w.kvh * WG_D + c * 8, ok);
      }
      cp_async_mbar_arrive(fulls[m]);
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

template <int S>
__device__ __forceinline__ void flash_prefill_ws(WG_PREFILL_PARAMS) {
  WG_SMEM_Q;
  uint8_t* const ks = qs + WG_QBYTES;
  uint8_t* const vs = ks + S * WG_TBYTES;
  // fullQ, fullK[S], fullV[S], emptyK[S], emptyV[S]
  uint64_t* const bars = reinterpret_cast<uint64_t*>(vs + S * WG_TBYTES);
  uint64_t *fullq = bars, *fullk = bars + 1, *fullv = fullk + S;
  uint64_t *emptyk = fullv + S, *emptyv = emptyk + S;
  const WgTile w = wg_tile(tiles, heads, kv_heads, window);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wgi = warp >> 2;
  if (threadIdx.x == 0) {
    mbar_init(fullq, 128);
    for (int st = 0; st < S; st++) {
      mbar_init(fullk + st, 128);
      mbar_init(fullv + st, 128);
      mbar_init(emptyk + st, 8);  // one arrival per consumer warp
      mbar_init(emptyv + st, 8);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // Registers move from the producer warpgroup to the consumers (40 + 2 x
  // 232 of a lane's 512 per multiprocessor quarter).
  if (wgi == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    ws_produce<S>(qs, ks, vs, bars, q, kc, vc, keys, w);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  float o[16][4];
  wg_zero(o);
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
  const int tok0 = (warp * 16) % w.MT + (lane >> 2);
  const half2 sh2 = __float2half2_rn(scale);
  const uint8_t* const qwg = qs + wgi * 64 * 128;
  uint32_t pa[8][4];  // P of the previous tile
  // The copies are the generic proxy's, the products read through the
  // async proxy: a proxy fence after each full barrier.
  mbar_wait(fullq, 0);
  if (wgi == 1) named_arrive(1, 256);  // warpgroup 0 issues first
  // Tile n: S_n issued beside PV_{n-1} (none for the first), the softmax
  // of S_n while PV_{n-1} runs, then O rescaled and P_n packed.
  auto step = [&](int n, bool pv) {
    const int kt = w.t0 + n, st = n % S, pst = (n + S - 1) % S;
    mbar_wait(fullk + st, (n / S) & 1);
    if (pv) mbar_wait(fullv + pst, ((n - 1) / S) & 1);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    named_sync(1 + wgi, 256);
    float s[16][4];
    wg_issue_qk(s, qwg, ks + st * WG_TBYTES);
    if (pv) wg_issue_pv(o, pa, vs + pst * WG_TBYTES);
    named_arrive(2 - wgi, 256);
    if (pv)
      wg_wait<1>();
    else
      wg_wait<0>();
    wg_keep_all(s);
    if (lane == 0) mbar_arrive(emptyk + st);
    float alpha[2];
    wg_softmax(s, w, kt, tok0, window, sh2, mrow, lrow, alpha);
    if (pv) {
      wg_wait<0>();
      wg_keep_all(o);
      if (lane == 0) mbar_arrive(emptyv + pst);
    }
    wg_rescale(o, alpha);
    wg_pack_p(pa, s);
  };
  const int nt = w.t1 - w.t0 + 1;
  step(0, false);
  for (int n = 1; n < nt; n++) step(n, true);
  const int pst = (nt - 1) % S;
  const uint32_t pph = ((nt - 1) / S) & 1;
  mbar_wait(fullv + pst, pph);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  wg_issue_pv(o, pa, vs + pst * WG_TBYTES);
  wg_wait<0>();
  wg_keep_all(o);
  // Warpgroup 1's last arrival on barrier 1 (it arrived once before the
  // loop) is waited for here, so both barriers end with no arrivals.
  if (wgi == 0) named_sync(1, 256);
  wg_store_out(out, o, lrow, w, warp);
}

// Two stages of K and V (the engine's), and three (164 and 230 KB of
// shared memory).
extern "C" __global__ void __launch_bounds__(384, 1) flash_prefill_ws_d128(WG_PREFILL_PARAMS) {
  flash_prefill_ws<2>(q, kc, vc, nullptr, nullptr, keys, tiles, out, heads, kv_heads, window,
                      scale);
}
extern "C" __global__ void __launch_bounds__(384, 1) flash_prefill_ws3_d128(WG_PREFILL_PARAMS) {
  flash_prefill_ws<3>(q, kc, vc, nullptr, nullptr, keys, tiles, out, heads, kv_heads, window,
                      scale);
}
