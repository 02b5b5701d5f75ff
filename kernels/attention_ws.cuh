// The warp-specialized, persistent wgmma flash prefill
// (kernels/WGMMA-PREFILL-PLAN.md, steps 3-6), included by attention_wg.cu
// after the plain kernel whose pieces it shares: the same arithmetic in the
// same order, so the same bits. One block per multiprocessor walks its
// share of the work items (tile, KV head) of the host's list (ws_item).
// 384 threads: warpgroups 0 and 1 compute (64 rows each, 232 registers),
// warpgroup 2 gathers each item's Q into one of QB buffers and its K and V
// tiles into a ring of S stages through cp.async, each buffer's arrival counted on a "full" mbarrier and its release on an
// "empty" one, so the next item's loads run under this one's last tiles
// and its output stores. A computing warpgroup issues S_n = Q K_n^T and O
// += P_{n-1} V_{n-1} together, runs tile n's softmax while the second
// product is on the tensor cores, then rescales O; the two warpgroups take
// turns issuing (named barriers 1 and 2), so one's softmax runs under the
// other's products.
#pragma once
#include "sm90.cuh"

// The block's i-th work item: rounds of gridDim.x items over the list
// (longest first), the blocks taking a round's items in turn, in reverse
// every other round (a snake: the block that took a round's longest item
// takes the next round's shortest). Run 82's schedule, block b taking item
// b of every round, left the first blocks the longest of each round: at
// one 2,048-token prompt (512 items, ~4 rounds on 132 SMs) block 0's keys
// were ~1.23x the mean, the snake's ~1.0x.
__device__ __forceinline__ int ws_item(int i) {
  const int b = (i & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  return i * gridDim.x + b;
}

// The blocks' mbarriers: Q buffers full/empty, K and V stages full/empty.
template <int S, int QB>
struct WsBars {
  uint64_t fullq[QB], emptyq[QB], fullk[S], fullv[S], emptyk[S], emptyv[S];
};

// The producer. Warp pw gathers rows 32pw..32pw+31 of a key tile, a
// half-warp per 256-byte row (lane l holds the slot of row 32pw + l);
// zeros past kmax (V must be finite there). Global tile n goes to stage n %
// S, item i's Q to buffer i % QB, each once the consumers released it.
template <int S, int QB>
__device__ __forceinline__ void ws_produce(uint8_t* qs, uint8_t* ks, uint8_t* vs,
                                           WsBars<S, QB>& b, const half* q, const half* kc,
                                           const half* vc, const unsigned* keys,
                                           const int4* tiles, int ntiles, int heads,
                                           int kv_heads, int window) {
  const int ptid = threadIdx.x - 256, pw = ptid >> 5, lane = threadIdx.x & 31;
  const int c = lane & 15, hr = lane >> 4;
  // Byte offset of pass i's chunk in a stage: row 32pw + 2i + hr, whose
  // swizzle row (2i + hr) & 7 has i's bits above hr's.
  const int base = (c >> 3) * WG_KT * 128 + (32 * pw + hr) * 128, cx = (c & 7) ^ hr;
  int n = 0;
  for (int qi = 0, item; (item = ws_item(qi)) < ntiles * kv_heads; qi++) {
    const WgTile w = wg_tile(tiles, item / kv_heads, item % kv_heads, heads, kv_heads, window);
    const int qb = qi % QB;
    mbar_wait(&b.emptyq[qb], ((qi / QB) & 1) ^ 1);  // the previous use's release
    for (int i = ptid; i < WG_ROWS * 16; i += 128) wg_load_q(qs + qb * WG_QBYTES, q, w, i);
    cp_async_mbar_arrive(&b.fullq[qb]);
    const size_t head = (size_t)w.kvh * WG_D + c * 8;
    for (int kt = w.t0; kt <= w.t1; kt++, n++) {
      const int st = n % S;
      const uint32_t par = ((n / S) & 1) ^ 1;
      const int lim = w.kmax - kt * WG_KT - 32 * pw;  // rows rr <= lim exist
      const unsigned slot = lane <= lim ? __ldg(keys + w.koff + kt * WG_KT + 32 * pw + lane) : 0u;
#pragma unroll
      for (int m = 0; m < 2; m++) {
        mbar_wait(m == 0 ? &b.emptyk[st] : &b.emptyv[st], par);
        uint8_t* dst = (m == 0 ? ks : vs) + st * WG_TBYTES + base;
        const half* src = (m == 0 ? kc : vc) + head;
#pragma unroll
        for (int i = 0; i < 16; i++) {
          const int rr = 2 * i + hr;
          const size_t sl = __shfl_sync(0xffffffffu, slot, rr);
          cp_async16(dst + i * 256 + ((cx ^ ((2 * i) & 7)) << 4), src + sl * w.kvstride, rr <= lim);
        }
        cp_async_mbar_arrive(m == 0 ? &b.fullk[st] : &b.fullv[st]);
      }
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// X (the `_x` build, not the engine's: no faster in W3, run 89): an item's last PV goes beside
// the next item's first S in one step (the item's l kept for its stores),
// so the overlap does not stop at item boundaries; the same arithmetic per
// item, so the same bits.
template <int S, int QB, bool X>
__device__ __forceinline__ void flash_prefill_ws(WG_PREFILL_PARAMS, int ntiles) {
  WG_SMEM_Q;
  uint8_t* const ks = qs + QB * WG_QBYTES;
  uint8_t* const vs = ks + S * WG_TBYTES;
  WsBars<S, QB>& b = *reinterpret_cast<WsBars<S, QB>*>(vs + S * WG_TBYTES);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, wgi = warp >> 2;
  if (threadIdx.x == 0) {
    for (int i = 0; i < QB; i++) {
      mbar_init(&b.fullq[i], 128);
      mbar_init(&b.emptyq[i], 8);  // one arrival per consumer warp
    }
    for (int st = 0; st < S; st++) {
      mbar_init(&b.fullk[st], 128);
      mbar_init(&b.fullv[st], 128);
      mbar_init(&b.emptyk[st], 8);
      mbar_init(&b.emptyv[st], 8);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // Registers move from the producer warpgroup to the consumers (40 + 2 x
  // 232 of a lane's 512 per multiprocessor quarter).
  if (wgi == 2) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    ws_produce<S, QB>(qs, ks, vs, b, q, kc, vc, keys, tiles, ntiles, heads, kv_heads, window);
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");

  const half2 sh2 = __float2half2_rn(scale);
  uint32_t pa[8][4];  // P of the previous tile
  float o[16][4], mrow[2], lrow[2];
  int n = 0;  // the block's key tiles so far (stage n % S)
  // Tile n of the item: S_n issued beside PV_{n-1} (none for an item's
  // first), the softmax of S_n while PV_{n-1} runs, then O rescaled and P_n
  // packed. The copies are the generic proxy's, the products read through
  // the async proxy: a proxy fence after each full barrier.
  auto step = [&](const WgTile& w, const uint8_t* qwg, int kt, int tok0, bool pv) {
    const int st = n % S, pst = (n + S - 1) % S;
    mbar_wait(&b.fullk[st], (n / S) & 1);
    if (pv) mbar_wait(&b.fullv[pst], ((n - 1) / S) & 1);
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
    if (lane == 0) mbar_arrive(&b.emptyk[st]);
    float alpha[2];
    wg_softmax(s, w, kt, tok0, window, sh2, mrow, lrow, alpha);
    if (pv) {
      wg_wait<0>();
      wg_keep_all(o);
      if (lane == 0) mbar_arrive(&b.emptyv[pst]);
    }
    wg_rescale(o, alpha);
    wg_pack_p(pa, s);
    n++;
  };
  // X: the first tile of item w beside the last PV of item wp (whose
  // running sums lp are its own): wp's output is stored once that PV is
  // done, then O starts from zero (what the rescale of a zeroed O by the
  // first tile's alpha gives).
  auto step_across = [&](const WgTile& w, const uint8_t* qwg, int tok0, const WgTile& wp) {
    const int st = n % S, pst = (n + S - 1) % S;
    mbar_wait(&b.fullk[st], (n / S) & 1);
    mbar_wait(&b.fullv[pst], ((n - 1) / S) & 1);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    named_sync(1 + wgi, 256);
    float s[16][4];
    wg_issue_qk(s, qwg, ks + st * WG_TBYTES);
    wg_issue_pv(o, pa, vs + pst * WG_TBYTES);
    named_arrive(2 - wgi, 256);
    wg_wait<1>();
    wg_keep_all(s);
    if (lane == 0) mbar_arrive(&b.emptyk[st]);
    const float lp[2] = {lrow[0], lrow[1]};
    mrow[0] = mrow[1] = -INFINITY;
    lrow[0] = lrow[1] = 0.f;
    float alpha[2];
    wg_softmax(s, w, w.t0, tok0, window, sh2, mrow, lrow, alpha);
    wg_wait<0>();
    wg_keep_all(o);
    if (lane == 0) mbar_arrive(&b.emptyv[pst]);
    wg_store_out(out, o, lp, wp, warp);
    wg_zero(o);
    wg_pack_p(pa, s);
    n++;
  };

  // An item's last PV and its output's stores (X: deferred to the next
  // item's first step, and after the last item).
  auto finish = [&](const WgTile& w) {
    const int pst = (n - 1) % S;
    mbar_wait(&b.fullv[pst], ((n - 1) / S) & 1);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    wg_issue_pv(o, pa, vs + pst * WG_TBYTES);
    wg_wait<0>();
    wg_keep_all(o);
    if (lane == 0) mbar_arrive(&b.emptyv[pst]);
    wg_store_out(out, o, lrow, w, warp);
  };
  // A fresh item's O and running max and sum.
  auto begin = [&] {
    wg_zero(o);
    mrow[0] = mrow[1] = -INFINITY;
    lrow[0] = lrow[1] = 0.f;
  };

  if (wgi == 1) named_arrive(1, 256);  // warpgroup 0 issues first
  WgTile wp{};  // X: the previous item, its last PV not yet issued
  bool open = false;
  for (int qi = 0, item; (item = ws_item(qi)) < ntiles * kv_heads; qi++) {
    const WgTile w = wg_tile(tiles, item / kv_heads, item % kv_heads, heads, kv_heads, window);
    const int qb = qi % QB;
    if (!X) begin();  // (before the Q wait, as the engine's build always had it)
    const int tok0 = (warp * 16) % w.MT + (lane >> 2);
    const uint8_t* const qwg = qs + qb * WG_QBYTES + wgi * 64 * 128;
    mbar_wait(&b.fullq[qb], (qi / QB) & 1);
    if (X && open) {
      step_across(w, qwg, tok0, wp);
    } else {
      if (X) begin();
      step(w, qwg, w.t0, tok0, false);
    }
    for (int kt = w.t0 + 1; kt <= w.t1; kt++) step(w, qwg, kt, tok0, true);
    if (lane == 0) mbar_arrive(&b.emptyq[qb]);  // the item's last S is done
    if (X) {
      wp = w;
      open = true;
    } else {
      finish(w);
    }
  }
  if (X && open) finish(wp);
  // Warpgroup 1's last arrival on barrier 1 (it arrived once before the
  // loop) is waited for here, so both barriers end with no arrivals.
  if (wgi == 0) named_sync(1, 256);
}

// Two Q buffers and two stages of K and V (197 KB of shared memory; one Q
// buffer and three stages measured slower in run 82).
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_prefill_ws_d128(WG_PREFILL_PARAMS, int ntiles) {
  flash_prefill_ws<2, 2, false>(q, kc, vc, nullptr, nullptr, keys, tiles, out, heads, kv_heads,
                                window, scale, ntiles);
}

// The same with an item's last PV beside the next item's first S (X; the
// `Crossed` launch, not the engine's).
extern "C" __global__ void __launch_bounds__(384, 1)
    flash_prefill_ws_x_d128(WG_PREFILL_PARAMS, int ntiles) {
  flash_prefill_ws<2, 2, true>(q, kc, vc, nullptr, nullptr, keys, tiles, out, heads, kv_heads,
                               window, scale, ntiles);
}
