// Decode attention over the paged KV cache (included by attention.cu, after
// its helpers: mma.cuh, the FP8 widening, qk_tile, the online softmax).
#pragma once

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
// items[i * (2 + 16 RG) ..] = {p, n, s_0 .. s_{n-1}} is partition p of the n
// (n * G <= 16 RG) sequences s_j, which the host found to cover the same
// cache blocks there and to see all PART keys of it (no window cut). Row r
// of the item is head r % G of sequence s_{r / G}; the block's RG row
// groups of NW warps each take 16 rows (warp w: row group w / NW, keys
// 16 (w % NW) .. of each tile), so the partition's K/V is read once for all
// of them. A row's arithmetic is the same instruction sequence over the
// same keys as in its own block (the rows of an mma are independent, and
// a row group's NW warps split the keys as the per-sequence block's do),
// so its partials are bit-identical to the unshared kernel's. The unshared
// launch then skips partitions p < skip[b].
//
// F8 (an FP8 cache; ksc/vsc its scales): the stages hold a tile's codes and
// scales; each warp widens its own 16 keys of K and V into a warp-private
// f16 tile, then runs the same arithmetic on it.
//
// DIR (F8 "direct", the *_f8d builds; the engine's FP8 decode): no widened
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

template <int D, int NW, int ST, bool F8, bool DIR, int RG, bool SW>
struct DecodeSmem {
  static constexpr int RS = D + 8;
  static constexpr int TS = SW ? D : RS;  // f16 stage rows: swizzled, or padded
  static constexpr int KT = 16 * NW;
  static constexpr int CS = DIR ? D + 16 : D;      // bytes per code row
  static constexpr int CODES = ST * 2 * KT * CS;   // bytes: [ST][K, V][KT][CS]
  static constexpr int SCALES = ST * 2 * KT * 4;  // bytes: [ST][K, V][KT] f32
  // bytes: [NW * RG][K, V][16][RS] halves (each warp widens its keys)
  static constexpr int TILES = DIR ? 0 : NW * RG * 2 * 16 * RS * 2;
  // Bytes before the block table.
  static constexpr int BYTES = F8 ? CODES + SCALES + TILES : ST * 2 * KT * TS * 2;
};

template <int D, int NW, int ST, bool SH, bool F8, bool DIR, int RG, bool SW>
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
  constexpr int NT = 32 * NW * RG;  // threads
  static_assert(SH || RG == 1, "row groups are the shared launch's");
  using SM = DecodeSmem<D, NW, ST, F8, DIR, RG, SW>;
  // SW (f16, D = 128; `_sw_` builds, the engine's f16 decode): stage rows of
  // 256 bytes, unpadded, their 16-byte chunks at chunk ^ (row & 7), so a
  // 128-byte piece of a cache row lands in one aligned 128-byte piece of
  // shared memory (the padded rows, 272 bytes apart, split each in two)
  // and ldmatrix's 8 rows still hit 8 different bank groups.
  static_assert(!SW || (D == 128 && !F8), "swizzled stages: f16, head dim 128");
  constexpr int TS = SM::TS;
  // Halves from a stage row's start to column c (a multiple of 8) of row r.
  auto col = [](int r, int c) { return SW ? ((c >> 3) ^ (r & 7)) << 3 : c; };
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
  const int* item = SH ? items + (size_t)blockIdx.y * (2 + 16 * RG) : nullptr;
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
  const int kw = warp % NW, r0 = warp / NW * 16;  // keys 16 kw.. of a tile; rows r0..r0 + 15
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
  // The cache rows of keys kp, kp + step, .. (0 past kend: a zero-filled
  // load): one division by the block size per walk, then a block's offset
  // stepped (an integer division per row was half of the tile loop's
  // instructions).
  struct Walk {
    int blk, off, held;  // held: the block whose first slot `first` is
    size_t first;
  };
  auto walk_from = [&](int kp) {
    const int blk = kp / block_size;
    return Walk{blk, kp - blk * block_size, -1, 0};
  };
  auto walk_slot = [&](Walk& w, int kp, int step) -> size_t {
    size_t sl = 0;
    if (kp < kend) {
      if (w.held != w.blk) {  // a table read only on entering a block
        w.first = (size_t)tab[w.blk - b0] * block_size;
        w.held = w.blk;
      }
      sl = w.first + w.off;
    }
    w.off += step;
    while (w.off >= block_size) {
      w.off -= block_size;
      w.blk++;
    }
    return sl;
  };
  auto load = [&](int k0, int st) {
    if (F8) {
      constexpr int C = D / 16;       // 16-code vectors per row
      constexpr int STEP = NT / C;    // rows between a thread's vectors
      static_assert(NT % C == 0, "a thread's vectors share their column");
      uint8_t* kb = codes + st * 2 * KT * CS;
      uint8_t* vb = kb + KT * CS;
      const int rt = threadIdx.x / C, c = (threadIdx.x % C) * 16;
      Walk w = walk_from(k0 + rt);
      for (int r = rt; r < KT; r += STEP) {
        const bool ok = k0 + r < kend;
        const size_t off = walk_slot(w, k0 + r, STEP) * row + (size_t)kvh * D + c;
        cp_async16(kb + r * CS + c, k8 + off, ok);
        cp_async16(vb + r * CS + c, v8 + off, ok);
      }
      if (threadIdx.x < KT) {  // KT < NT: a row's two scales per thread
        const bool ok = k0 + (int)threadIdx.x < kend;
        Walk ws = walk_from(k0 + threadIdx.x);
        const size_t so = walk_slot(ws, k0 + threadIdx.x, 0) * nkv + kvh;
        float* sb = scl + st * 2 * KT + threadIdx.x;
        cp_async4(sb, ksc + so, ok);
        cp_async4(sb + KT, vsc + so, ok);
      }
      return;
    }
    half* ks = smem + st * 2 * KT * TS;
    half* vs = ks + KT * TS;
    constexpr int STEP = NT / VPR;  // rows between a thread's vectors
    static_assert(NT % VPR == 0, "a thread's vectors share their column");
    const int rt = threadIdx.x / VPR, c = (threadIdx.x % VPR) * 8;
    Walk w = walk_from(k0 + rt);
#pragma unroll
    for (int n = 0; n < (KT + STEP - 1) / STEP; n++) {  // rows rt + n * STEP
      const int r = rt + n * STEP;
      if (KT % STEP != 0 && r >= KT) break;
      const bool ok = k0 + r < kend;
      const size_t off = walk_slot(w, k0 + r, STEP) * row + (size_t)kvh * D + c;
      cp_async16(ks + r * TS + col(r, c), kc + off, ok);
      cp_async16(vs + r * TS + col(r, c), vc + off, ok);
    }
  };
  const int ntiles = (kend - kstart + KT - 1) / KT;
#pragma unroll
  for (int i = 0; i < ST - 1; i++) {
    if (i < ntiles) load(kstart + i * KT, i);
    cp_async_commit();
  }

  // Q fragments: rows r0 + g and r0 + g + 8 (zero past R).
  uint32_t qa[KS][4];
  {
    const int ra = r0 + g, rb = r0 + g + 8;
    const bool va = ra < R, vb = rb < R;
    const half* qra = q + (!va ? 0 : SH ? head(ra) : qhead0 + ra) * D;
    const half* qrb = q + (!vb ? 0 : SH ? head(rb) : qhead0 + rb) * D;
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

  // One tile's products for this warp's rows over its 16 keys of the
  // tile in stage it % ST.
  auto tile_step = [&](int it) {
    const half* ks = smem + (it % ST) * 2 * KT * TS + kw * 16 * TS;
    const half* vs = ks + KT * TS;
    // F8: this warp's 16 keys' K codes (V's KT * CS further) and K
    // scales (V's KT further) in the stage.
    const uint8_t* const kd = codes + (it % ST) * 2 * KT * CS + kw * 16 * CS;
    const float* const ksd = scl + (it % ST) * 2 * KT + kw * 16;
    if (F8 && !DIR) {  // widen this warp's 16 keys of K and V into its own tile
      constexpr int C = D / 16;
      half* kt = wtile + warp * 2 * 16 * RS;  // this warp's own
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
    } else if (SW) {
      // qk_tile's reads at the swizzled columns (row & 7 = lane & 7: the
      // warp's keys start at a multiple of 8 rows).
#pragma unroll
      for (int j = 0; j < 2; j++) {
#pragma unroll
        for (int r = 0; r < 4; r++) s[j][r] = 0.f;
        const half* kr = ks + (j * 8 + (lane & 7)) * TS;
#pragma unroll
        for (int s2 = 0; s2 < KS; s2 += 2) {
          uint32_t b[4];
          ldsm_x4(b, kr + col(lane, s2 * 16 + ((lane >> 3) & 1) * 8 + (lane >> 4) * 16));
          mma_16816(s[j], qa[s2], b[0], b[1]);
          mma_16816(s[j], qa[s2 + 1], b[2], b[3]);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; j++) qk_tile<KS, RS>(s[j], qa, ks + j * 8 * RS, lane);
    }
    const int k0 = kstart + it * KT + kw * 16;
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
    // O *= alpha, skipped where it is exactly 1 for every lane (the max
    // did not move: o * 1 = o) and for rows g + 8 when they are past the
    // item's rows (R <= r0 + 8: G <= 8 outside a shared item), whose
    // accumulators are never written out.
    const bool hi = r0 + 8 < R;
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || (hi && alpha[1] != 1.f))) {
      if (hi) {
#pragma unroll
        for (int dn = 0; dn < DN; dn++)
#pragma unroll
          for (int i = 0; i < 4; i++) o[dn][i] *= alpha[i >> 1];
      } else {
#pragma unroll
        for (int dn = 0; dn < DN; dn++) {
          o[dn][0] *= alpha[0];
          o[dn][1] *= alpha[0];
        }
      }
    }
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
        mma_16816(o[dn], pa, b0, b1);
      }
      return;
    }
    const uint32_t pa[4] = {pack_h2(s[0][0], s[0][1]), pack_h2(s[0][2], s[0][3]),
                            pack_h2(s[1][0], s[1][1]), pack_h2(s[1][2], s[1][3])};
#pragma unroll
    for (int dn = 0; dn < DN; dn += 2) {
      uint32_t bb[4];
      const int vr = lane & 15;  // (the warp's keys start at a multiple of 16 rows)
      ldsm_x4_t(bb, vs + vr * TS + col(vr, dn * 8 + (lane >> 4) * 8));
      mma_16816(o[dn], pa, bb[0], bb[1]);
      mma_16816(o[dn + 1], pa, bb[2], bb[3]);
    }
  };

  for (int it = 0; it < ntiles; it++) {
    // Tile it + ST - 1 goes into the stage tile it - 1 used (free since the
    // previous iteration's closing barrier); an empty group keeps the count.
    if (it + ST - 1 < ntiles) load(kstart + (it + ST - 1) * KT, (it + ST - 1) % ST);
    cp_async_commit();
    cp_async_wait<ST - 1>();
    __syncthreads();
    // A row group past the item's rows only loads (uniform per warp).
    if (r0 < R) tile_step(it);
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
    const int r = r0 + g + 8 * hr;
    if (r >= R) continue;
    float* dst = red_o + (kw * R + r) * D;
#pragma unroll
    for (int dn = 0; dn < DN; dn++) {
      // Column 2t (+1) of n-tile dn: dim dn * 8 + 2t, DIR: (2t) * DN + dn.
      dst[DIR ? 2 * t * DN + dn : dn * 8 + 2 * t] = o[dn][2 * hr];
      dst[DIR ? (2 * t + 1) * DN + dn : dn * 8 + 2 * t + 1] = o[dn][2 * hr + 1];
    }
    if (t == 0) {
      red_m[kw * R + r] = mrow[hr];
      red_l[kw * R + r] = lrow[hr];
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
#define DECODE_ENTRY(NAME, D, NW, ST, SH, F8, DIR, RG, SW) \
  DECODE_ENTRY_B(NAME, D, NW, ST, SH, F8, DIR, RG, SW, RG > 1 ? 2 : 1)
// The same with MINB blocks per multiprocessor asked of the compiler.
#define DECODE_ENTRY_B(NAME, D, NW, ST, SH, F8, DIR, RG, SW, MINB)                            \
  extern "C" __global__ void __launch_bounds__(32 * NW * RG, MINB)                             \
      NAME(const half* q, const void* kc, const void* vc, const float* ksc, const float* vsc,  \
           const int* tables, const int* ctx_lens, const unsigned* rows, float* part_o,       \
           float* part_ml, half* out, const int* items, const unsigned* skip, int nh,         \
           int nkv, int max_blocks, int block_size, int window, float scale, int P) {         \
    decode_impl<D, NW, ST, SH, F8, DIR, RG, SW>(q, kc, vc, ksc, vsc, tables, ctx_lens, rows, \
                                                part_o, part_ml, out, items, skip, nh, nkv,  \
                                                max_blocks, block_size, window, scale, P);   \
  }
// Shared builds: `_r64` (4 row groups, the engine's) and `_r16` (one: the
// previous engine's, for the benches and the bit-identity test).
#define DECODE(D, NW, ST)                                                                  \
  DECODE_ENTRY(paged_decode_d##D##_w##NW##s##ST, D, NW, ST, false, false, false, 1, false)  \
  DECODE_ENTRY(paged_decode_shared_r16_d##D##_w##NW##s##ST, D, NW, ST, true, false, false, 1, \
               false)                                                                       \
  DECODE_ENTRY(paged_decode_shared_r64_d##D##_w##NW##s##ST, D, NW, ST, true, false, false, 4, \
               false)
// The FP8 cache's builds: the engine's (2 warps, 2 stages, widening), and
// the direct builds (DIR) of 2 and 3 stages.
#define DECODE_F8(D)                                                                         \
  DECODE_ENTRY(paged_decode_f8_d##D##_w2s2, D, 2, 2, false, true, false, 1, false)           \
  DECODE_ENTRY(paged_decode_shared_r64_f8_d##D##_w2s2, D, 2, 2, true, true, false, 4, false) \
  DECODE_ENTRY(paged_decode_f8d_d##D##_w2s2, D, 2, 2, false, true, true, 1, false)           \
  DECODE_ENTRY(paged_decode_shared_r64_f8d_d##D##_w2s2, D, 2, 2, true, true, true, 4, false) \
  DECODE_ENTRY(paged_decode_f8d_d##D##_w2s3, D, 2, 3, false, true, true, 1, false)           \
  DECODE_ENTRY(paged_decode_shared_r64_f8d_d##D##_w2s3, D, 2, 3, true, true, true, 4, false)
#define DECODE_VARIANTS(D) \
  DECODE(D, 2, 2)          \
  DECODE(D, 4, 2)          \
  DECODE(D, 2, 3)          \
  DECODE(D, 4, 3)          \
  DECODE(D, 2, 4)
// The swizzled f16 builds (SW; head dim 128, per-sequence launch only; a
// shared launch beside them is the padded one): w2s2 is the engine's f16
// decode.
DECODE_ENTRY(paged_decode_sw_d128_w2s2, 128, 2, 2, false, false, false, 1, true)
DECODE_ENTRY(paged_decode_sw_d128_w2s3, 128, 2, 3, false, false, false, 1, true)
// One stage at 8 blocks per multiprocessor (<= 128 registers; 16.5 KB of
// shared memory against the 2-stage build's 33 KB, which fits 6 blocks):
// more warps in flight instead of a second stage, for short contexts (run
// 91: 512 x 192 at 18.75% occupancy, 5.17 waves). For `runner bench
// --kernels` and the bit-identity test; not the engine's.
DECODE_ENTRY_B(paged_decode_sw_d128_w2s1, 128, 2, 1, false, false, false, 1, true, 8)
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
