//! Our kernel files as the device loads them. build.rs compiles each of
//! kernels/*.cu to PTX (compute_80 and compute_90; compute_90a for the
//! Hopper-only files) and assembles that PTX to SASS (sm_80, sm_90,
//! sm_90a), and all of it is embedded. A device of compute capability 8.x
//! loads the sm_80 SASS, 9.0 the sm_90 (or sm_90a) SASS, so no process
//! waits on the driver's PTX compiler (run 91, H200: ~25 s on a fresh
//! machine before the first forward, most of it ours); a newer device
//! gets the compute_90 PTX and compiles it once.

use super::arch;
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::CudaDevice;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// One kernel file: its PTX and SASS per target ("" / empty where a
/// target is not built).
pub(crate) struct Module {
    name: &'static str,
    ptx80: &'static str,
    ptx90: &'static str,
    sass80: &'static [u8],
    sass90: &'static [u8],
}

macro_rules! module {
    ($name:literal) => {
        Module {
            name: $name,
            ptx80: include_str!(concat!(env!("OUT_DIR"), "/", $name, "_sm80.ptx")),
            ptx90: include_str!(concat!(env!("OUT_DIR"), "/", $name, "_sm90.ptx")),
            sass80: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, "_sm80.cubin")),
            sass90: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, "_sm90.cubin")),
        }
    };
    // A Hopper-only file: compute_90a / sm_90a alone.
    ($name:literal, sm90a) => {
        Module {
            name: $name,
            ptx80: "",
            ptx90: include_str!(concat!(env!("OUT_DIR"), "/", $name, "_sm90a.ptx")),
            sass80: &[],
            sass90: include_bytes!(concat!(env!("OUT_DIR"), "/", $name, "_sm90a.cubin")),
        }
    };
}

pub(crate) const GPTQ: Module = module!("gptq");
pub(crate) const ATTENTION: Module = module!("attention");
pub(crate) const OPS: Module = module!("ops");
/// Hopper-only kernels (wgmma), built for sm_90a alone: launched only
/// where `is_sm90a` holds (there is no sm_80 build).
pub(crate) const GPTQ_WG: Module = module!("gptq_wg", sm90a);
/// The wgmma flash prefill's pieces (kernels/attention_wg.cu), Hopper only
/// like [`GPTQ_WG`].
pub(crate) const ATTENTION_WG: Module = module!("attention_wg", sm90a);

/// What a device of compute capability `cc` loads of `m`: SASS where
/// there is a build for its architecture, PTX otherwise; and its tag.
fn image(m: &Module, cc: (i32, i32)) -> (Ptx, &'static str) {
    match cc.0 {
        9 if cc.1 == 0 && !m.sass90.is_empty() => (Ptx::from_binary(m.sass90.to_vec()), "sass90"),
        8 if !m.sass80.is_empty() => (Ptx::from_binary(m.sass80.to_vec()), "sass80"),
        0..=8 => (Ptx::from_src(m.ptx80), "ptx80"),
        _ => (Ptx::from_src(m.ptx90), "ptx90"),
    }
}

/// A module loaded on a device, and the dynamic shared memory each of its
/// kernels has been allowed so far.
struct Loaded {
    module: Arc<CudaModule>,
    allowed: HashMap<String, u32>,
}

/// `name` of module `m` on `dev` (the module loaded once per device),
/// allowed at least `smem` bytes of dynamic shared memory. The handles are
/// shared by every thread launching on the device, so that allowance only
/// ever grows (under the lock): a launch never finds it below its own.
pub(crate) fn function(
    dev: &CudaDevice,
    m: &Module,
    name: &str,
    smem: u32,
) -> Result<CudaFunction> {
    static LOADED: OnceLock<Mutex<HashMap<(usize, &'static str), Loaded>>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| Error::Device("the kernel module cache is poisoned".into()))?;
    let here = match loaded.entry((ctx.ordinal(), m.name)) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => {
            let (image, tag) = image(m, arch(dev).cc);
            let module = ctx.load_module(image).map_err(|e| {
                Error::Device(format!("loading kernels/{}.cu ({tag}): {e}", m.name))
            })?;
            tracing::debug!(module = m.name, image = tag, "kernel module loaded");
            e.insert(Loaded {
                module,
                allowed: HashMap::new(),
            })
        }
    };
    let func = here
        .module
        .load_function(name)
        .map_err(|e| Error::Device(format!("kernel {name} of kernels/{}.cu: {e}", m.name)))?;
    let now = here.allowed.get(name).copied().unwrap_or(0);
    if smem > now {
        // Dynamic shared memory plus the kernel's static arrays may pass
        // the 48 KiB a kernel gets without opting in.
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
        func.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| Error::Device(format!("cuda kernel {name}: shared memory: {e}")))?;
        here.allowed.insert(name.to_string(), smem);
    }
    Ok(func)
}
