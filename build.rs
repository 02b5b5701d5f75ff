//! With the `cuda` feature: compiles kernels/*.cu to PTX for compute_80
//! and compute_90 with nvcc ($CUDA_HOME/bin/nvcc, else the one on PATH),
//! then assembles each PTX to SASS for sm_80 and sm_90; both are embedded
//! (src/backend/cuda/module.rs) and picked by the device's compute
//! capability, so a device of 8.x or 9.0 runs without the driver's PTX
//! compiler. kernels/gptq_wg.cu and attention_wg.cu (Hopper warpgroup
//! code) are built for compute_90a / sm_90a only, and launched on compute
//! capability 9.0 only. The builds run in parallel.

use std::path::{Path, PathBuf};
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
    let builds: Vec<(&str, &str)> = builds.collect();
    std::thread::scope(|sc| {
        for &(k, arch) in &builds {
            let (nvcc, out) = (&nvcc, &out);
            sc.spawn(move || build(nvcc, out, k, arch));
        }
    });
}

/// kernels/{k}.cu to {k}_sm{arch}.ptx (compute_{arch}), then that PTX to
/// {k}_sm{arch}.cubin (sm_{arch}).
fn build(nvcc: &Path, out: &Path, k: &str, arch: &str) {
    let ptx = out.join(format!("{k}_sm{arch}.ptx"));
    let cubin = out.join(format!("{k}_sm{arch}.cubin"));
    let ptx_step: Vec<String> = vec![
        "-ptx".into(),
        "-O3".into(),
        "-std=c++17".into(),
        "-lineinfo".into(),
        format!("-arch=compute_{arch}"),
        format!("kernels/{k}.cu"),
    ];
    let sass_step: Vec<String> = vec![
        "-cubin".into(),
        "-O3".into(),
        format!("-arch=sm_{arch}"),
        ptx.display().to_string(),
    ];
    for (args, dst, what) in [(ptx_step, &ptx, "PTX"), (sass_step, &cubin, "SASS")] {
        let status = Command::new(nvcc)
            .args(&args)
            .arg("-o")
            .arg(dst)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {} ({e}); install a CUDA toolkit (kernels/cuda-toolchain.sh) or set CUDA_HOME", nvcc.display())
            });
        assert!(
            status.success(),
            "nvcc failed on kernels/{k}.cu: {what} for {arch}"
        );
    }
}
