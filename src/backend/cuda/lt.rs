//! cuBLASLt products y [M, N] = x [M, K] W^T over the resident f16
//! weights (W^T [K, N], as `GptqGpu`'s `resident` and candle's `matmul`
//! read them), with the algorithm chosen by the caller from the list
//! cuBLASLt's heuristic offers: the kernel bench times every one of them
//! beside cuBLAS's own choice (candle's `matmul`), to see how far that
//! choice is from the best cuBLAS has for our shapes.
//!
//! The same arithmetic contract as candle's f16 product: f16 inputs and
//! output, f32 compute and scale (`CUBLAS_COMPUTE_32F`).

use super::{device_of, empty, ptr};
use crate::{Error, Result};
use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
use candle_core::Tensor;
use half::f16;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

/// The workspace NVIDIA recommends for Hopper (32 MiB).
const WORKSPACE: usize = 32 << 20;

/// One algorithm cuBLASLt offers for a shape, and what it is.
#[derive(Clone, Copy)]
pub struct LtAlgo {
    algo: sys::cublasLtMatmulAlgo_t,
    workspace: usize,
    /// Algorithm id, tile id, stages id, K splits (1: none), reduction
    /// scheme, cluster shape id.
    pub config: [u32; 6],
}

impl std::fmt::Debug for LtAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl LtAlgo {
    /// "id/tile/stages/splits/reduction/cluster", e.g. "66/20/35/1/0/2".
    pub fn describe(&self) -> String {
        let c = self.config.map(|v| v.to_string());
        c.join("/")
    }

    /// The number of K splits (1: the K reduction runs in order in one
    /// block per output tile).
    pub fn splits(&self) -> u32 {
        self.config[3]
    }

    /// Whether it reduces each output's K in one block, in order: no K
    /// split and no reduction scheme (what the batch-invariant products
    /// take).
    pub fn split_free(&self) -> bool {
        self.splits() == 1 && self.config[4] == 0
    }
}

/// How many values of `a` and `b` differ (`-0.0` equals `0.0`): how the
/// bench, the tuner and the tests compare an algorithm's output with
/// another's.
pub fn count_differing(a: &Tensor, b: &Tensor) -> Result<usize> {
    let ne = a.ne(b)?.to_dtype(candle_core::DType::F32)?.sum_all()?;
    Ok(ne.to_scalar::<f32>()? as usize)
}

fn err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Device(format!("cublaslt {what}: {e:?}"))
}

/// A stream's cuBLASLt handle and workspace, made once and shared by the
/// products queued on it.
struct Shared {
    handle: sys::cublasLtHandle_t,
    ws: Tensor,
}

// SAFETY: a cuBLASLt handle may be used from any thread (the library keeps
// no per-thread state in it); the workspace belongs to one stream (the map
// below is keyed by stream), whose products write it in stream order.
unsafe impl Send for Shared {}
// SAFETY: as for Send: calls through a shared handle are thread-safe, and
// two streams never share a workspace.
unsafe impl Sync for Shared {}

/// The handle and workspace of `like`'s stream (candle's stream of its
/// device handle: tests and engines may hold several on one GPU).
fn shared(like: &Tensor) -> Result<Arc<Shared>> {
    static MAP: OnceLock<Mutex<HashMap<usize, Arc<Shared>>>> = OnceLock::new();
    let dev = device_of(like)?;
    let stream = dev.cuda_stream().cu_stream() as usize;
    let mut map = MAP
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| Error::Device("cublaslt: the handle map's lock is poisoned".into()))?;
    if let Some(s) = map.get(&stream) {
        return Ok(s.clone());
    }
    let s = Arc::new(Shared {
        handle: lt::create_handle().map_err(|e| err("handle", e))?,
        ws: empty::<u8>(&dev, WORKSPACE)?,
    });
    map.insert(stream, s.clone());
    Ok(s)
}

/// How a product's f16 weight lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// W^T [K, N] row-major (`GptqGpu`'s resident copy).
    Kn,
    /// W [N, K] row-major, as a dense checkpoint stores it (the LM head).
    Nk,
}

impl WeightLayout {
    /// The weight's dims for a product of `n` outputs over `k` inputs.
    pub fn dims(self, n: usize, k: usize) -> [usize; 2] {
        match self {
            Self::Kn => [k, n],
            Self::Nk => [n, k],
        }
    }
}

/// The descriptors of one product shape over its device's shared handle.
pub struct LtProduct {
    shared: Arc<Shared>,
    desc: sys::cublasLtMatmulDesc_t,
    /// W^T as column-major [N, K] (or W as [K, N], transposed by the
    /// descriptor), x as column-major [K, M], y as [N, M].
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    pref: sys::cublasLtMatmulPreference_t,
    dims: (usize, usize, usize),
    weight: WeightLayout,
}

// SAFETY: the descriptors are written only in `new` and destroyed only in
// Drop; cuBLASLt reads them without writing during heuristics and matmuls,
// so calls from several threads through one product are safe (the shared
// handle and workspace: see `Shared`).
unsafe impl Send for LtProduct {}
// SAFETY: as for Send: every method takes `&self` and only reads the
// descriptors.
unsafe impl Sync for LtProduct {}

impl LtProduct {
    /// The descriptors of y [m, n] = x [m, k] W^T on the device of `like`,
    /// W^T given as [k, n].
    pub fn new(like: &Tensor, m: usize, n: usize, k: usize) -> Result<Self> {
        Self::with_layout(like, (m, n, k), WeightLayout::Kn)
    }

    /// The descriptors of y [m, n] = x [m, k] W^T on the device of `like`,
    /// the weight laid out as `weight` says.
    pub fn with_layout(
        like: &Tensor,
        (m, n, k): (usize, usize, usize),
        weight: WeightLayout,
    ) -> Result<Self> {
        let shared = shared(like)?;
        let h16 = sys::cudaDataType::CUDA_R_16F;
        // Built field by field: a failure drops what was made (Drop skips
        // the null ones).
        let mut p = Self {
            shared,
            desc: std::ptr::null_mut(),
            layouts: [std::ptr::null_mut(); 3],
            pref: std::ptr::null_mut(),
            dims: (m, n, k),
            weight,
        };
        p.desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| err("matmul descriptor", e))?;
        let a = match weight {
            WeightLayout::Kn => (n, k),
            WeightLayout::Nk => {
                let t = cublas_sys::cublasOperation_t::CUBLAS_OP_T;
                // SAFETY: `desc` was just created and is alive; the buffer
                // is the i32-sized enum the attribute takes, read for its
                // size.
                unsafe {
                    lt::set_matmul_desc_attribute(
                        p.desc,
                        sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                        &t as *const cublas_sys::cublasOperation_t as *const c_void,
                        std::mem::size_of::<cublas_sys::cublasOperation_t>(),
                    )
                }
                .map_err(|e| err("transpose attribute", e))?;
                (k, n)
            }
        };
        for (i, (rows, cols)) in [a, (k, m), (n, m)].into_iter().enumerate() {
            p.layouts[i] = lt::create_matrix_layout(h16, rows as u64, cols as u64, rows as i64)
                .map_err(|e| err("layout", e))?;
        }
        p.pref = lt::create_matmul_pref().map_err(|e| err("preference", e))?;
        let bytes = WORKSPACE as u64;
        // SAFETY: `pref` was just created and is alive; the buffer is a u64
        // read for its size, as the attribute's type says.
        unsafe {
            lt::set_matmul_pref_attribute(
                p.pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
        }
        .map_err(|e| err("workspace preference", e))?;
        Ok(p)
    }

    /// Up to `count` algorithms, in the heuristic's order (its first is
    /// what it would pick).
    pub fn algos(&self, count: usize) -> Result<Vec<LtAlgo>> {
        let mut found = vec![
            // SAFETY: a plain C struct of integers and floats; all zeros is
            // a valid (empty) value that the call overwrites.
            unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() };
            count
        ];
        let mut n = 0i32;
        let [a, b, d] = self.layouts;
        // SAFETY: every descriptor is alive (dropped only in Drop); `found`
        // holds `count` results for the call to fill, `n` says how many.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.shared.handle,
                self.desc,
                a,
                b,
                d,
                d,
                self.pref,
                count as i32,
                found.as_mut_ptr(),
                &mut n,
            )
            .result()
        }
        .map_err(|e| err("heuristic", e))?;
        found.truncate(n.max(0) as usize);
        Ok(found
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| LtAlgo {
                algo: r.algo,
                workspace: r.workspaceSize,
                config: config_of(&r.algo),
            })
            .collect())
    }

    /// `algo` (offered for another M of the same N, K and layout) as it
    /// runs at this product's M, with the workspace it needs here; `None`
    /// where cuBLASLt says it cannot run this shape
    /// (`cublasLtMatmulAlgoCheck`).
    pub fn check(&self, algo: &LtAlgo) -> Result<Option<LtAlgo>> {
        // SAFETY: a plain C struct of integers and floats; all zeros is a
        // valid (empty) value that the call overwrites.
        let mut r = unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() };
        let [a, b, d] = self.layouts;
        // SAFETY: every descriptor is alive (dropped only in Drop); `algo`
        // is an initialized algorithm from the heuristic, read by the call;
        // `r` is the one result it writes.
        let status = unsafe {
            sys::cublasLtMatmulAlgoCheck(
                self.shared.handle,
                self.desc,
                a,
                b,
                d,
                d,
                &algo.algo,
                &mut r,
            )
        };
        let ok = status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
            && r.workspaceSize <= WORKSPACE;
        Ok(ok.then_some(LtAlgo {
            algo: algo.algo,
            workspace: r.workspaceSize,
            config: algo.config,
        }))
    }

    /// y [m, n] = x [m, k] W^T through `algo`, `wt` the f16 weights in
    /// the product's layout ([k, n] unless made `with_layout`), both
    /// contiguous.
    pub fn run(&self, x: &Tensor, wt: &Tensor, algo: &LtAlgo) -> Result<Tensor> {
        let (m, n, k) = self.dims;
        let w = self.weight.dims(n, k);
        if x.dims() != [m, k] || wt.dims() != w || !x.is_contiguous() || !wt.is_contiguous() {
            return Err(Error::Model(format!(
                "cublaslt product for contiguous [{m}, {k}] x {w:?} was given {:?} x {:?}",
                x.dims(),
                wt.dims()
            )));
        }
        let dev = device_of(x)?;
        let y = empty::<f16>(&dev, (m, n))?;
        let (px, pw, py) = (ptr::<f16>(x)?, ptr::<f16>(wt)?, ptr::<f16>(&y)?);
        let pws = ptr::<u8>(&self.shared.ws)?;
        let (one, zero) = (1f32, 0f32);
        let stream = dev.cuda_stream().cu_stream() as sys::cudaStream_t;
        let [la, lb, ld] = self.layouts;
        // SAFETY: the descriptors are alive; the pointers are device
        // addresses of tensors alive for the call, of the sizes the layouts
        // say (checked above); the workspace holds WORKSPACE bytes, at least
        // what any offered algorithm asked for; launched on candle's stream,
        // ordered with the kernels that made x and read y.
        unsafe {
            lt::matmul(
                self.shared.handle,
                self.desc,
                &one as *const f32 as *const c_void,
                &zero as *const f32 as *const c_void,
                pw as *const c_void,
                la,
                px as *const c_void,
                lb,
                py as *const c_void,
                ld,
                py as *mut c_void,
                ld,
                &algo.algo,
                pws as *mut c_void,
                algo.workspace.min(WORKSPACE),
                stream,
            )
        }
        .map_err(|e| err("matmul", e))?;
        Ok(y)
    }
}

/// The configuration attributes of an algorithm (zero where the library
/// does not report one).
fn config_of(algo: &sys::cublasLtMatmulAlgo_t) -> [u32; 6] {
    use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
    let attrs = [
        A::CUBLASLT_ALGO_CONFIG_ID,
        A::CUBLASLT_ALGO_CONFIG_TILE_ID,
        A::CUBLASLT_ALGO_CONFIG_STAGES_ID,
        A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
        A::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME,
        A::CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID,
    ];
    attrs.map(|a| {
        let (mut need, mut got) = (0usize, 0usize);
        let mut buf = [0u8; 8];
        // SAFETY: `algo` is an initialized algorithm from the heuristic; a
        // first call with no buffer asks the attribute's size, the second
        // writes at most that many bytes into an 8-byte buffer (checked).
        let ok = unsafe {
            let s = sys::cublasLtMatmulAlgoConfigGetAttribute(
                algo,
                a,
                std::ptr::null_mut(),
                0,
                &mut need,
            );
            s == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                && need <= buf.len()
                && sys::cublasLtMatmulAlgoConfigGetAttribute(
                    algo,
                    a,
                    buf.as_mut_ptr() as *mut c_void,
                    need,
                    &mut got,
                ) == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
        };
        if ok {
            u64::from_le_bytes(buf) as u32
        } else {
            0
        }
    })
}

impl Drop for LtProduct {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created in `new` and is
        // destroyed once, here; no call uses them after (the shared handle
        // stays).
        unsafe {
            for l in self.layouts.into_iter().filter(|l| !l.is_null()) {
                let _ = lt::destroy_matrix_layout(l);
            }
            if !self.pref.is_null() {
                let _ = lt::destroy_matmul_pref(self.pref);
            }
            if !self.desc.is_null() {
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }
}
