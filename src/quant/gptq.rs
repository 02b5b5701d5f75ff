//! The GPTQ weight format (AutoGPTQ/TheBloke layout) and its exact
//! dequantization: the CPU reference that the CUDA kernels are checked against.
//!
//! Per linear with K inputs and N outputs: `qweight` i32 [K/pack, N] packed
//! along K, `qzeros` i32 [G, N/pack] packed along N, `scales` f16 [G, N],
//! `g_idx` i32 [K]; value j of a word sits at bits [j*bits, (j+1)*bits).
//! `W[k, n] = scales[g, n] * (q[k, n] - z[g, n])` with `g = g_idx[k]`, where
//! `z = z_stored + 1` in format "gptq" (v1) and `z = z_stored` in "gptq_v2".

use super::{CheckpointFormat, QuantConfig};

/// One GPTQ linear layer as stored, unpacked only on demand.
#[derive(Debug, Clone)]
pub struct GptqWeight {
    /// Input features (K).
    pub in_features: usize,
    /// Output features (N).
    pub out_features: usize,
    /// The quantization.
    pub quant: QuantConfig,
    /// [K/pack, N], row-major.
    pub qweight: Vec<i32>,
    /// [G, N/pack], row-major.
    pub qzeros: Vec<i32>,
    /// [G, N], as f32 (exact copies of the stored f16).
    pub scales: Vec<f32>,
    /// [K], each in [0, G).
    pub g_idx: Vec<i32>,
    /// Whether every zero is the symmetric midpoint (2^(bits-1)).
    pub symmetric_zeros: bool,
}

fn unpack(word: i32, j: usize, bits: u32) -> u32 {
    ((word as u32) >> (j as u32 * bits)) & ((1u32 << bits) - 1)
}

impl GptqWeight {
    /// The layers side by side along N (one product for layers that share
    /// an input, e.g. q/k/v), when they can be: the same quantization and
    /// input size, the same act-order groups (`g_idx`: GPTQ gives layers
    /// that see the same input the same permutation), and widths that are
    /// whole packed zero words. `None` otherwise.
    pub fn concat_n(parts: &[&GptqWeight]) -> Option<GptqWeight> {
        let first = parts.first()?;
        let pack = first.quant.pack();
        if parts.iter().any(|p| {
            p.quant != first.quant
                || p.in_features != first.in_features
                || p.g_idx != first.g_idx
                || p.out_features % pack != 0
        }) {
            return None;
        }
        let n: usize = parts.iter().map(|p| p.out_features).sum();
        let rows = |v: fn(&GptqWeight) -> (&[i32], usize)| -> Vec<i32> {
            let height = v(first).0.len() / v(first).1;
            (0..height)
                .flat_map(|r| {
                    parts.iter().flat_map(move |p| {
                        let (data, w) = v(p);
                        data[r * w..(r + 1) * w].iter().copied()
                    })
                })
                .collect()
        };
        let qweight = rows(|p| (&p.qweight, p.out_features));
        let qzeros = rows(|p| (&p.qzeros, p.out_features / p.quant.pack()));
        let groups = first.scales.len() / first.out_features;
        let scales = (0..groups)
            .flat_map(|g| {
                parts.iter().flat_map(move |p| {
                    p.scales[g * p.out_features..(g + 1) * p.out_features]
                        .iter()
                        .copied()
                })
            })
            .collect();
        Some(GptqWeight {
            in_features: first.in_features,
            out_features: n,
            quant: first.quant.clone(),
            qweight,
            qzeros,
            scales,
            g_idx: first.g_idx.clone(),
            symmetric_zeros: parts.iter().all(|p| p.symmetric_zeros),
        })
    }

    /// Builds a weight from already-checked parts.
    pub fn new(
        k: usize,
        n: usize,
        quant: QuantConfig,
        qweight: Vec<i32>,
        qzeros: Vec<i32>,
        scales: Vec<f32>,
        g_idx: Vec<i32>,
    ) -> Self {
        let mid = 1u32 << (quant.bits - 1);
        let offset = match quant.format {
            CheckpointFormat::Gptq => 1,
            CheckpointFormat::GptqV2 => 0,
        };
        let pack = quant.pack();
        let symmetric_zeros = qzeros
            .iter()
            .all(|&w| (0..pack).all(|j| unpack(w, j, quant.bits) + offset == mid));
        Self {
            in_features: k,
            out_features: n,
            quant,
            qweight,
            qzeros,
            scales,
            g_idx,
            symmetric_zeros,
        }
    }

    /// The quantized value q[k, n].
    pub fn q(&self, k: usize, n: usize) -> u32 {
        let pack = self.quant.pack();
        unpack(
            self.qweight[(k / pack) * self.out_features + n],
            k % pack,
            self.quant.bits,
        )
    }

    /// The true zero point z[g, n] (with the v1 offset applied).
    pub fn zero(&self, g: usize, n: usize) -> u32 {
        let pack = self.quant.pack();
        let stored = unpack(
            self.qzeros[g * (self.out_features / pack) + n / pack],
            n % pack,
            self.quant.bits,
        );
        match self.quant.format {
            CheckpointFormat::Gptq => stored + 1,
            CheckpointFormat::GptqV2 => stored,
        }
    }

    /// Exact dequantization, transposed to [N, K] row-major (the layout of a
    /// dense `nn.Linear` weight). Each value is `scale * (q - z)` computed in
    /// f32, where it is exact for f16 scales and integer offsets below 2^11.
    pub fn dequantize_nk(&self) -> Vec<f32> {
        let (k_dim, n_dim) = (self.in_features, self.out_features);
        let mut out = vec![0f32; n_dim * k_dim];
        for k in 0..k_dim {
            let g = self.g_idx[k] as usize;
            for n in 0..n_dim {
                let w = self.scales[g * n_dim + n] * (self.q(k, n) as f32 - self.zero(g, n) as f32);
                out[n * k_dim + k] = w;
            }
        }
        out
    }
}

/// A random GPTQ layer's shape and quantization; [`RandomGptq::build`] makes it: random quantized values, v1 zeros
/// in `[1, 2^bits]`, f16 scales in [`RandomGptq::scale_range`] and, with act-order, a
/// random permutation of equal-size groups (as GPTQ produces).
#[derive(Debug, Clone, Copy)]
pub struct RandomGptq {
    /// 4 or 8.
    pub bits: u32,
    /// Rows per group, `None` for one group.
    pub group_size: Option<usize>,
    /// Input features (a multiple of 32 / bits).
    pub k: usize,
    /// Output features (a multiple of 32 / bits).
    pub n: usize,
    /// Shuffle rows over groups.
    pub act_order: bool,
    /// Seed of the generator.
    pub seed: u64,
}

impl RandomGptq {
    /// The range `(lo, span)` the random scales are drawn from: the
    /// dequantized weights get a standard deviation of about `1/sqrt(k)`,
    /// so that a product keeps its input's scale and a dummy model's
    /// activations stay finite in f16 through every layer (with the old
    /// fixed scales the residual grew ~10x per layer and overflowed).
    pub fn scale_range(&self) -> (f32, f32) {
        let m = (1u64 << self.bits) as f64;
        let qz_std = (2.0 * (m * m - 1.0) / 12.0).sqrt(); // q - z, both uniform
        let mean = 1.0 / (qz_std * (self.k.max(1) as f64).sqrt());
        ((0.5 * mean) as f32, mean as f32)
    }

    /// Builds the weight in the AutoGPTQ v1 layout.
    pub fn build(&self) -> GptqWeight {
        let (k, n, bits) = (self.k, self.n, self.bits);
        let mut s = self.seed ^ 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let pack = (32 / bits) as usize;
        let max = 1u32 << bits;
        let quant = QuantConfig {
            bits,
            group_size: self.group_size,
            desc_act: self.act_order,
            sym: false,
            format: CheckpointFormat::Gptq,
        };
        let groups = quant.groups(k);
        let pack_words = |vals: &mut dyn Iterator<Item = u32>, words: usize| -> Vec<i32> {
            (0..words)
                .map(|_| {
                    (0..pack).fold(0u32, |w, j| {
                        w | (vals.next().unwrap_or(0) << (j as u32 * bits))
                    }) as i32
                })
                .collect()
        };
        let q: Vec<u32> = (0..k * n).map(|_| next() % max).collect(); // [K][N]
        let mut qweight = vec![0i32; k / pack * n];
        for r in 0..k / pack {
            for c in 0..n {
                let mut col = (0..pack).map(|j| q[(r * pack + j) * n + c]);
                qweight[r * n + c] = pack_words(&mut col, 1)[0];
            }
        }
        let mut stored = (0..groups * n)
            .map(|_| next() % max)
            .collect::<Vec<_>>()
            .into_iter();
        let qzeros = pack_words(&mut stored, groups * n / pack);
        let (lo, span) = self.scale_range();
        let scales = (0..groups * n)
            .map(|_| half::f16::from_f32(lo + span * (next() % 10_000) as f32 / 10_000.0).to_f32())
            .collect();
        let gs = self.group_size.unwrap_or(k.max(1));
        let mut g_idx: Vec<i32> = (0..k).map(|i| (i / gs) as i32).collect();
        if self.act_order {
            for i in (1..k).rev() {
                let j = next() as usize % (i + 1);
                g_idx.swap(i, j);
            }
        }
        GptqWeight::new(k, n, quant, qweight, qzeros, scales, g_idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concat_n_puts_the_layers_side_by_side() {
        for (bits, group) in [(4, Some(32)), (8, None), (4, Some(64))] {
            let build = |n, seed| {
                RandomGptq {
                    bits,
                    group_size: group,
                    k: 256,
                    n,
                    act_order: true,
                    seed,
                }
                .build()
            };
            let (a, mut b, mut c) = (build(64, 1), build(16, 2), build(32, 3));
            b.g_idx = a.g_idx.clone();
            c.g_idx = a.g_idx.clone();
            let joined = GptqWeight::concat_n(&[&a, &b, &c]).expect("same groups");
            assert_eq!(joined.out_features, 112);
            let want: Vec<f32> = [&a, &b, &c]
                .iter()
                .flat_map(|w| w.dequantize_nk()) // [N, K]: rows append
                .collect();
            assert_eq!(joined.dequantize_nk(), want, "{bits}-bit {group:?}");
            // Different act-order groups cannot share one product (one
            // group: every g_idx is all zeros, so any layers can).
            let d = build(16, 4);
            if group.is_some() {
                assert!(d.g_idx != a.g_idx);
                assert!(GptqWeight::concat_n(&[&a, &d]).is_none());
            }
        }
    }

    /// Independent packer: puts value j of each word at bits [j*bits, (j+1)*bits).
    fn pack_along(values: &[u32], bits: u32) -> Vec<i32> {
        let per = (32 / bits) as usize;
        values
            .chunks(per)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u32, |w, (j, &v)| w | (v << (j as u32 * bits))) as i32
            })
            .collect()
    }

    /// Builds a GPTQ weight from explicit q [K][N], zeros [G][N] (true zeros),
    /// scales [G][N] and g_idx, packed as AutoGPTQ does.
    fn build(
        bits: u32,
        group_size: Option<usize>,
        format: CheckpointFormat,
        q: &[Vec<u32>],
        zeros: &[Vec<u32>],
        scales: &[Vec<f32>],
        g_idx: Vec<i32>,
    ) -> GptqWeight {
        let (k, n) = (q.len(), q[0].len());
        let pack = (32 / bits) as usize;
        // qweight packs along K: word (r, c) holds q[r*pack + j][c].
        let mut qweight = vec![0i32; k / pack * n];
        for r in 0..k / pack {
            for c in 0..n {
                let col: Vec<u32> = (0..pack).map(|j| q[r * pack + j][c]).collect();
                qweight[r * n + c] = pack_along(&col, bits)[0];
            }
        }
        let stored: Vec<u32> = zeros
            .iter()
            .flat_map(|row| {
                row.iter().map(|&z| match format {
                    CheckpointFormat::Gptq => z - 1,
                    CheckpointFormat::GptqV2 => z,
                })
            })
            .collect();
        let qzeros = pack_along(&stored, bits);
        let quant = QuantConfig {
            bits,
            group_size,
            desc_act: true,
            sym: false,
            format,
        };
        let flat_scales = scales.iter().flatten().copied().collect();
        GptqWeight::new(k, n, quant, qweight, qzeros, flat_scales, g_idx)
    }

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    fn check(bits: u32, group_size: Option<usize>, format: CheckpointFormat, act_order: bool) {
        let (k, n) = (64, 16);
        let g = group_size.map_or(1, |gs| k / gs);
        let mut s = 7u64 + bits as u64;
        let max = 1u32 << bits;
        let q: Vec<Vec<u32>> = (0..k)
            .map(|_| (0..n).map(|_| lcg(&mut s) % max).collect())
            .collect();
        let zeros: Vec<Vec<u32>> = (0..g)
            .map(|_| (0..n).map(|_| 1 + lcg(&mut s) % (max - 1)).collect())
            .collect();
        let scales: Vec<Vec<f32>> = (0..g)
            .map(|_| {
                (0..n)
                    .map(|_| {
                        half::f16::from_f32(0.001 + (lcg(&mut s) % 1000) as f32 * 1e-4).to_f32()
                    })
                    .collect()
            })
            .collect();
        let gs = group_size.unwrap_or(k);
        let mut g_idx: Vec<i32> = (0..k).map(|i| (i / gs) as i32).collect();
        if act_order {
            // Scatter rows over groups, every group keeping group_size members.
            for i in (1..k).rev() {
                let j = lcg(&mut s) as usize % (i + 1);
                g_idx.swap(i, j);
            }
        }
        let w = build(bits, group_size, format, &q, &zeros, &scales, g_idx.clone());
        let deq = w.dequantize_nk();
        for kk in 0..k {
            let gg = g_idx[kk] as usize;
            for nn in 0..n {
                let want = scales[gg][nn] * (q[kk][nn] as f32 - zeros[gg][nn] as f32);
                assert_eq!(deq[nn * k + kk], want, "bits {bits} k {kk} n {nn}");
            }
        }
    }

    #[test]
    fn unpacks_4bit() {
        check(4, Some(16), CheckpointFormat::Gptq, false);
    }

    #[test]
    fn unpacks_8bit() {
        check(8, Some(16), CheckpointFormat::Gptq, false);
    }

    #[test]
    fn v1_zeros_are_stored_minus_one_and_v2_are_true() {
        check(4, Some(32), CheckpointFormat::Gptq, false);
        check(4, Some(32), CheckpointFormat::GptqV2, false);
        // The same stored word means different zeros in the two formats.
        let quant = |format| QuantConfig {
            bits: 4,
            group_size: None,
            desc_act: false,
            sym: true,
            format,
        };
        let word = 0x7777_7777u32 as i32;
        let v1 = GptqWeight::new(
            8,
            8,
            quant(CheckpointFormat::Gptq),
            vec![0; 8],
            vec![word],
            vec![1.0; 8],
            vec![0; 8],
        );
        let v2 = GptqWeight::new(
            8,
            8,
            quant(CheckpointFormat::GptqV2),
            vec![0; 8],
            vec![word],
            vec![1.0; 8],
            vec![0; 8],
        );
        assert_eq!(v1.zero(0, 3), 8);
        assert_eq!(v2.zero(0, 3), 7);
        assert!(v1.symmetric_zeros);
        assert!(!v2.symmetric_zeros);
    }

    #[test]
    fn act_order_g_idx_selects_each_rows_group() {
        check(4, Some(16), CheckpointFormat::Gptq, true);
        check(8, Some(32), CheckpointFormat::Gptq, true);
    }

    #[test]
    fn group_size_minus_one_is_one_group() {
        check(8, None, CheckpointFormat::Gptq, true);
        check(4, None, CheckpointFormat::Gptq, false);
    }
}
