//! With the `cuda` feature: compiles kernels/*.cu to PTX for sm_80 and
//! sm_90 with nvcc ($CUDA_HOME/bin/nvcc, else the one on PATH); the PTX is
//! embedded by src/cuda and picked by the device's compute capability.
//! kernels/gptq_wg.cu (Hopper warpgroup products) is compiled for
//! compute_90a only, and launched on compute capability 9.0 only.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["gptq", "attention", "ops"];
/// Built for compute_90a alone (wgmma exists on sm_90a only).
const KERNELS_90A: [&str; 2] = ["gptq_wg", "attention_wg"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for k in KERNELS.iter().chain(&KERNELS_90A) {
        println!("cargo:rerun-if-changed=kernels/{k}.cu");
    }
    for h in [
        "softmax",
        "mma",
        "gptq",
        "wgmma",
        "attention_decode",
        "attention_prefill",
        "attention_ws",
        "sm90",
    ] {
        println!("cargo:rerun-if-changed=kernels/{h}.cuh");
    }
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("CUDA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("nvcc"))
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let builds = KERNELS
        .iter()
        .flat_map(|k| [(*k, "80"), (*k, "90")])
        .chain(KERNELS_90A.iter().map(|k| (*k, "90a")));
    for (k, arch) in builds {
        let dst = out.join(format!("{k}_sm{arch}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{arch}"))
            .arg(format!("kernels/{k}.cu"))
            .arg("-o")
            .arg(&dst)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({e}); install a CUDA toolkit (kernels/cuda-toolchain.sh) or set CUDA_HOME", nvcc.display())
            });
        assert!(
            status.success(),
            "nvcc failed on kernels/{k}.cu for compute_{arch}"
        );
    }
}
