//! The tuned products' choices kept across processes (`lt_tune`): one
//! JSON map in `$XDG_CACHE_HOME/runner/cublas-tuning.json` (else
//! `~/.cache/runner/...`), from "GPU name | cuBLASLt version | K | N | M"
//! to "cublas" or the chosen algorithm's configuration. A process reads
//! it once and rewrites it (to a temporary file, then renamed) after each
//! new timing; a file that cannot be read or written only costs the
//! timing again (logged once).

use crate::Result;
use candle_core::cuda_backend::cudarc::cublaslt::sys;
use candle_core::cuda_backend::CudaDevice;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

struct Store {
    path: Option<PathBuf>,
    map: BTreeMap<String, String>,
}

fn store() -> &'static Mutex<Store> {
    static S: OnceLock<Mutex<Store>> = OnceLock::new();
    S.get_or_init(|| {
        let path = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("runner").join("cublas-tuning.json"));
        let map = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|s| match serde_json::from_str(&s) {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!("cublas tuning cache unreadable ({e}); timing again");
                    None
                }
            })
            .unwrap_or_default();
        Mutex::new(Store { path, map })
    })
}

/// The key of a product of `dims` (M, N, K) on `cd`.
pub fn key(cd: &CudaDevice, (m, n, k): (usize, usize, usize)) -> Result<String> {
    let ctx = cd.cuda_stream().context().clone();
    let name = ctx
        .name()
        .map_err(|e| crate::Error::Device(format!("cuda: device name: {e}")))?;
    // SAFETY: a plain query of the loaded library's version, no arguments.
    let version = unsafe { sys::cublasLtGetVersion() };
    Ok(format!("{name} | {version} | {k} | {n} | {m}"))
}

/// The stored choice for `key`, if any.
pub fn get(key: &str) -> Option<String> {
    store().lock().ok()?.map.get(key).cloned()
}

/// Stores `choice` for `key` and rewrites the file.
pub fn put(key: String, choice: String) {
    let Ok(mut s) = store().lock() else { return };
    s.map.insert(key, choice);
    let Some(path) = s.path.clone() else { return };
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("json.{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_string_pretty(&s.map)?)?;
        std::fs::rename(&tmp, &path)
    };
    if let Err(e) = write() {
        static WARNED: OnceLock<()> = OnceLock::new();
        WARNED.get_or_init(|| {
            tracing::warn!("cublas tuning cache {}: not written ({e})", path.display())
        });
    }
}
