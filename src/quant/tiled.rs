//! The tile layout of GPTQ weights that the CUDA kernels read
//! (kernels/gptq.cu explains the fragment mapping). Built once at load on
//! the host; pure CPU so that the layout itself is tested without a GPU.
//!
//! Act-order: K is sorted by `g_idx` (stable), so every group becomes a run
//! of `group_size` consecutive sorted positions; `perm[sorted] = original`.
//! K is padded to a multiple of 64 and N to a multiple of 64 with zero
//! weights (`perm = -1` for padded positions).

use super::gptq::GptqWeight;
use crate::{Error, Result};
use half::f16;

/// K and N are padded to multiples of this.
pub const PAD: usize = 64;

/// A GPTQ weight in the kernels' tile layout.
#[derive(Debug, Clone)]
pub struct TiledGptq {
    /// 4 or 8.
    pub bits: u32,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Padded K.
    pub kp: usize,
    /// Padded N.
    pub np: usize,
    /// Sorted positions per group (Kp for a single group).
    pub gs: usize,
    /// Number of groups.
    pub groups: usize,
    /// [Kp]: original input column of each sorted position, -1 for padding.
    pub perm: Vec<i32>,
    /// Tile words, see kernels/gptq.cu.
    pub words: Vec<u32>,
    /// [groups, Np] pairs (scale, 1024 + zero), flattened.
    pub sz: Vec<f16>,
}

/// Index of value `i` (0..8) of a lane's tile: (row offset, column offset).
fn frag(i: usize) -> (usize, usize) {
    (((i >> 1) & 1) * 8, (i & 1) + (i >> 2) * 8)
}

/// Words per lane per int4 load and k per load.
fn k_per_load(bits: u32) -> usize {
    if bits == 4 {
        64
    } else {
        32
    }
}

impl TiledGptq {
    /// Repacks a checkpoint weight. Fails when act-order groups are not
    /// runs of `group_size` after sorting (never the case for GPTQ output).
    pub fn from_weight(w: &GptqWeight) -> Result<Self> {
        let (k, n, bits) = (w.in_features, w.out_features, w.quant.bits);
        let kp = k.div_ceil(PAD) * PAD;
        let np = n.div_ceil(PAD) * PAD;
        let groups = w.quant.groups(k);
        let gs = w.quant.group_size.unwrap_or(kp);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&i| w.g_idx[i]);
        for (s, &orig) in order.iter().enumerate() {
            if w.g_idx[orig] as usize != (s / gs).min(groups - 1) {
                return Err(Error::Model(format!(
                    "g_idx: group {} has a size other than {gs}; only GPTQ's equal-size act-order groups are supported",
                    w.g_idx[orig]
                )));
            }
        }
        let mut perm = vec![-1i32; kp];
        for (s, &o) in order.iter().enumerate() {
            perm[s] = o as i32;
        }
        // q in sorted order, [Np][Kp] by (n, sorted k).
        let q = |nn: usize, ks: usize| -> u32 {
            if nn >= n || ks >= k {
                0
            } else {
                w.q(order[ks], nn)
            }
        };
        let words = Self::pack_tiles(bits, kp, np, q);
        let mut sz = vec![f16::ZERO; 2 * groups * np];
        for g in 0..groups {
            for nn in 0..np {
                let (s, z) = if nn < n {
                    (w.scales[g * n + nn], w.zero(g, nn) as f32)
                } else {
                    (0.0, 0.0)
                };
                sz[2 * (g * np + nn)] = f16::from_f32(s);
                sz[2 * (g * np + nn) + 1] = f16::from_f32(1024.0 + z);
            }
        }
        Ok(Self {
            bits,
            k,
            n,
            kp,
            np,
            gs,
            groups,
            perm,
            words,
            sz,
        })
    }

    /// Packs q(n, sorted k) into tile words.
    fn pack_tiles(
        bits: u32,
        kp: usize,
        np: usize,
        q: impl Fn(usize, usize) -> u32 + Sync,
    ) -> Vec<u32> {
        let kpl = k_per_load(bits);
        let kq = kp / kpl;
        let per_tile = kq * 32 * 4; // words of one 16-column tile
        let mut words = vec![0u32; np / 16 * per_tile];
        // Column tiles own disjoint word ranges: pack them on every core
        // (a 7B checkpoint is ~7e9 values).
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let tiles_per_thread = (np / 16).div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (c, chunk) in words.chunks_mut(tiles_per_thread * per_tile).enumerate() {
                let q = &q;
                s.spawn(move || {
                    for (ti, tile) in chunk.chunks_mut(per_tile).enumerate() {
                        let nt = c * tiles_per_thread + ti;
                        Self::pack_tile(bits, kq, nt, tile, q);
                    }
                });
            }
        });
        words
    }

    /// Packs one 16-column tile (all of K) into its words.
    fn pack_tile(
        bits: u32,
        kq: usize,
        nt: usize,
        words: &mut [u32],
        q: &impl Fn(usize, usize) -> u32,
    ) {
        let kpl = k_per_load(bits);
        for qi in 0..kq {
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                let base = (qi * 32 + lane) * 4;
                for j in 0..kpl / 16 {
                    let k0 = qi * kpl + j * 16;
                    for i in 0..8 {
                        let (ro, co) = frag(i);
                        let v = q(nt * 16 + g + ro, k0 + 2 * t + co);
                        let r = i >> 1;
                        if bits == 4 {
                            words[base + j] |= v << (4 * (r + 4 * (i & 1)));
                        } else {
                            let byte = (r & 1) + 2 * (i & 1);
                            words[base + 2 * j + (r >> 1)] |= v << (8 * byte);
                        }
                    }
                }
            }
        }
    }

    /// Decodes the tile layout the way the kernels do (f16 arithmetic
    /// `(1024+q - (1024+z)) * s`), into W^T [K, N] in original row order.
    pub fn dequantize_kn_f16(&self) -> Vec<f16> {
        let kpl = k_per_load(self.bits);
        let kq = self.kp / kpl;
        let mut out = vec![f16::ZERO; self.k * self.n];
        for nt in 0..self.np / 16 {
            for qi in 0..kq {
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    let base = ((nt * kq + qi) * 32 + lane) * 4;
                    for j in 0..kpl / 16 {
                        let k0 = qi * kpl + j * 16;
                        let grp = (k0 / self.gs).min(self.groups - 1);
                        for i in 0..8 {
                            let (ro, co) = frag(i);
                            let r = i >> 1;
                            let v = if self.bits == 4 {
                                (self.words[base + j] >> (4 * (r + 4 * (i & 1)))) & 0xf
                            } else {
                                let byte = (r & 1) + 2 * (i & 1);
                                (self.words[base + 2 * j + (r >> 1)] >> (8 * byte)) & 0xff
                            };
                            let nn = nt * 16 + g + ro;
                            let ks = k0 + 2 * t + co;
                            let src = self.perm[ks];
                            if nn >= self.n || src < 0 {
                                continue;
                            }
                            let s = self.sz[2 * (grp * self.np + nn)];
                            let z = self.sz[2 * (grp * self.np + nn) + 1];
                            let d = f16::from_f32(1024.0 + v as f32) - z; // exact
                            out[src as usize * self.n + nn] = d * s;
                        }
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::RandomGptq;

    #[test]
    fn tile_layout_decodes_to_the_exact_f16_dequantization() {
        for (bits, group, k, n) in [
            (4, Some(32), 128, 96),
            (4, Some(128), 384, 128),
            (8, None, 128, 32),
            (8, Some(32), 96, 80),
            (4, None, 200, 24),
        ] {
            let w = RandomGptq {
                bits,
                group_size: group,
                k,
                n,
                act_order: true,
                seed: 7 + k as u64,
            }
            .build();
            let t = TiledGptq::from_weight(&w).unwrap();
            let want = w.dequantize_nk(); // [N, K] f32, exact
            let got = t.dequantize_kn_f16();
            for kk in 0..k {
                for nn in 0..n {
                    let exp = f16::from_f32(want[nn * k + kk]);
                    assert_eq!(
                        got[kk * n + nn],
                        exp,
                        "bits {bits} group {group:?} at k {kk} n {nn}"
                    );
                }
            }
        }
    }
}
