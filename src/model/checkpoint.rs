//! Reading safetensors checkpoints (single file or sharded with
//! `model.safetensors.index.json`), memory-mapped, with checked access.

use crate::{Error, Result};
use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// A checkpoint's tensors across its shard files.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
}

/// A raw tensor view: dtype, shape and little-endian bytes.
pub struct RawTensor<'a> {
    /// Stored dtype.
    pub dtype: Dtype,
    /// Stored shape.
    pub shape: Vec<usize>,
    /// The bytes.
    pub data: &'a [u8],
    /// The file it lives in.
    pub file: &'a Path,
}

impl Checkpoint {
    /// Opens every safetensors file of a model directory. A directory with
    /// only pickle weights is refused.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                Error::Model(format!("{}: invalid JSON: {e}", index_path.display()))
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| {
                    Error::Model(format!("{}: no `weight_map` object", index_path.display()))
                })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if single.is_file() {
                vec![single]
            } else {
                let mut found: Vec<PathBuf> = list_dir(dir)?
                    .into_iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                    .collect();
                found.sort();
                if found.is_empty() {
                    let names: Vec<String> = list_dir(dir)?
                        .iter()
                        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .collect();
                    return Err(super::source::pickle_refusal(
                        &format!("model directory {}", dir.display()),
                        &names,
                    ));
                }
                found
            }
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the checkpoint is opened read-only and not modified while mapped.
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let st = SafeTensors::deserialize(&mmap).map_err(|e| {
                Error::Model(format!(
                    "{}: not a valid safetensors file: {e}",
                    path.display()
                ))
            })?;
            for name in st.names() {
                index.insert(name.to_string(), shards.len());
            }
            shards.push(Shard { path, mmap });
        }
        Ok(Self { shards, index })
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> Result<usize> {
        let mut sum = 0;
        for name in self.index.keys() {
            sum += self.raw(name)?.data.len();
        }
        Ok(sum)
    }

    /// The raw view of a tensor.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let &i = self.index.get(name).ok_or_else(|| {
            Error::Model(format!(
                "tensor `{name}` is missing from the checkpoint ({})",
                self.shards
                    .first()
                    .map(|s| s.path.display().to_string())
                    .unwrap_or_default()
            ))
        })?;
        let shard = &self.shards[i];
        let st = SafeTensors::deserialize(&shard.mmap)
            .map_err(|e| Error::Model(format!("{}: {e}", shard.path.display())))?;
        let view = st
            .tensor(name)
            .map_err(|e| Error::Model(format!("{}: {e}", shard.path.display())))?;
        Ok(RawTensor {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: view.data(),
            file: &shard.path,
        })
    }

    /// A tensor checked against an expected shape, as a candle tensor of
    /// the given dtype on the given device. Float dtypes only.
    pub fn float(
        &self,
        name: &str,
        shape: &[usize],
        dtype: candle_core::DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let raw = self.raw(name)?;
        raw.expect_shape(name, shape)?;
        let stored = match raw.dtype {
            Dtype::F16 => candle_core::DType::F16,
            Dtype::BF16 => candle_core::DType::BF16,
            Dtype::F32 => candle_core::DType::F32,
            other => {
                return Err(raw.err(
                    name,
                    format!("dtype is {other:?}, expected F16, BF16 or F32"),
                ))
            }
        };
        let t = Tensor::from_raw_buffer(raw.data, stored, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(dev)?)
    }

    /// Checks a tensor's shape and dtype without reading its data.
    pub fn check(&self, name: &str, shape: &[usize], dtypes: &[Dtype]) -> Result<()> {
        let raw = self.raw(name)?;
        raw.expect_shape(name, shape)?;
        if !dtypes.contains(&raw.dtype) {
            return Err(raw.err(
                name,
                format!("dtype is {:?}, expected one of {dtypes:?}", raw.dtype),
            ));
        }
        Ok(())
    }

    /// An i32 tensor checked against an expected shape.
    pub fn i32s(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let raw = self.raw(name)?;
        raw.expect_shape(name, shape)?;
        if raw.dtype != Dtype::I32 {
            return Err(raw.err(name, format!("dtype is {:?}, expected I32", raw.dtype)));
        }
        Ok(raw
            .data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// An f16 tensor (GPTQ scales) as f32 values, checked against a shape.
    pub fn f16_as_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let raw = self.raw(name)?;
        raw.expect_shape(name, shape)?;
        match raw.dtype {
            Dtype::F16 => Ok(raw
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            Dtype::F32 => Ok(raw
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            other => Err(raw.err(name, format!("dtype is {other:?}, expected F16"))),
        }
    }
}

impl RawTensor<'_> {
    fn err(&self, name: &str, msg: String) -> Error {
        Error::Tensor {
            name: name.to_string(),
            file: self.file.to_path_buf(),
            msg,
        }
    }

    /// Errors naming the tensor when its shape differs.
    pub fn expect_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(self.err(
                name,
                format!("shape is {:?}, expected {:?}", self.shape, shape),
            ));
        }
        Ok(())
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
}
