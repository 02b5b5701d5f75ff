//! GPTQ weights read from a checkpoint (the format itself is
//! `crate::quant`, which knows nothing of files).

use crate::model::checkpoint::Checkpoint;
use crate::quant::{GptqWeight, QuantConfig};
use crate::{Error, Result};

impl GptqWeight {
    /// Loads `prefix.{qweight,qzeros,scales,g_idx}` and checks every shape
    /// and dtype against (K, N) and the quantization. A missing `g_idx`
    /// (checkpoints without act-order) means `k / group_size`.
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        k: usize,
        n: usize,
        quant: &QuantConfig,
    ) -> Result<Self> {
        let pack = quant.pack();
        if !k.is_multiple_of(pack) || !n.is_multiple_of(pack) {
            return Err(Error::Model(format!(
                "{prefix}: shape {k}x{n} is not a multiple of {pack} values per word"
            )));
        }
        let g = quant.groups(k);
        let qweight = ck.i32s(&format!("{prefix}.qweight"), &[k / pack, n])?;
        let qzeros = ck.i32s(&format!("{prefix}.qzeros"), &[g, n / pack])?;
        let scales = ck.f16_as_f32(&format!("{prefix}.scales"), &[g, n])?;
        let gname = format!("{prefix}.g_idx");
        let g_idx = if ck.contains(&gname) {
            ck.i32s(&gname, &[k])?
        } else {
            (0..k)
                .map(|i| (i / quant.group_size.unwrap_or(k.max(1))) as i32)
                .collect()
        };
        if let Some((i, bad)) = g_idx
            .iter()
            .enumerate()
            .find(|(_, &v)| v < 0 || v as usize >= g)
        {
            return Err(Error::Model(format!(
                "{gname}: entry {i} is {bad}, expected a group index in [0, {g})"
            )));
        }
        if ck.contains(&format!("{prefix}.bias")) {
            return Err(Error::Model(format!(
                "{prefix}.bias: biased linear layers are not part of Mistral"
            )));
        }
        Ok(Self::new(
            k,
            n,
            quant.clone(),
            qweight,
            qzeros,
            scales,
            g_idx,
        ))
    }

    /// Checks `prefix.{qweight,qzeros,scales,g_idx}` shapes and dtypes as
    /// [`GptqWeight::load`] does, without reading the data (`runner validate`).
    pub fn check(
        ck: &Checkpoint,
        prefix: &str,
        k: usize,
        n: usize,
        quant: &QuantConfig,
    ) -> Result<()> {
        use safetensors::Dtype;
        let pack = quant.pack();
        if !k.is_multiple_of(pack) || !n.is_multiple_of(pack) {
            return Err(Error::Model(format!(
                "{prefix}: shape {k}x{n} is not a multiple of {pack} values per word"
            )));
        }
        let g = quant.groups(k);
        ck.check(&format!("{prefix}.qweight"), &[k / pack, n], &[Dtype::I32])?;
        ck.check(&format!("{prefix}.qzeros"), &[g, n / pack], &[Dtype::I32])?;
        ck.check(
            &format!("{prefix}.scales"),
            &[g, n],
            &[Dtype::F16, Dtype::F32],
        )?;
        let gname = format!("{prefix}.g_idx");
        if ck.contains(&gname) {
            ck.check(&gname, &[k], &[Dtype::I32])?;
        }
        if ck.contains(&format!("{prefix}.bias")) {
            return Err(Error::Model(format!(
                "{prefix}.bias: biased linear layers are not part of Mistral"
            )));
        }
        Ok(())
    }
}
