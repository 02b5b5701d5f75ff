//! Token ids of a batch that are still on the device: the overlapped
//! step's greedy picks, read by the next step's embedding without a trip
//! through the host.

use crate::Result;
use candle_core::Tensor;

/// Row `rows[i]` of a batch's token ids takes `ids[src[i]]`.
#[derive(Debug, Clone)]
pub struct IdPatch {
    /// u32 `[n]` on the model's device.
    pub ids: Tensor,
    /// Rows of the flattened batch whose token is on the device.
    pub rows: Vec<u32>,
    /// For each of those rows, its element of `ids`.
    pub src: Vec<u32>,
}

impl IdPatch {
    /// `ids` (u32 `[T]`, the host's tokens) with the patched rows replaced.
    pub fn apply(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rows.is_empty() {
            return Ok(ids.clone());
        }
        let n = ids.dim(0)?;
        let (mut src, mut mask) = (vec![0u32; n], vec![0u8; n]);
        for (&r, &s) in self.rows.iter().zip(&self.src) {
            src[r as usize] = s;
            mask[r as usize] = 1;
        }
        let dev = ids.device();
        let src = Tensor::from_vec(src, n, dev)?;
        let mask = Tensor::from_vec(mask, n, dev)?;
        let gathered = self.ids.index_select(&src, 0)?;
        Ok(mask.where_cond(&gathered, ids)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn patched_rows_take_the_device_ids_and_the_rest_keep_the_hosts() {
        let dev = Device::Cpu;
        let host = Tensor::new(&[5u32, u32::MAX, 7, u32::MAX], &dev).unwrap();
        let p = IdPatch {
            ids: Tensor::new(&[40u32, 41, 42], &dev).unwrap(),
            rows: vec![1, 3],
            src: vec![2, 0],
        };
        let out = p.apply(&host).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(out, vec![5, 42, 7, 40]);
        let none = IdPatch {
            rows: vec![],
            src: vec![],
            ..p
        };
        assert_eq!(
            none.apply(&host).unwrap().to_vec1::<u32>().unwrap(),
            vec![5, u32::MAX, 7, u32::MAX]
        );
    }
}
