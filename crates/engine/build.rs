//! Embeds the CUDA kernel sources (`kernels/*.cu` and the shared `common.cuh`) in the binary;
//! NVRTC compiles them at run time for the GPU it finds, so no CUDA toolkit is needed to build.
use std::{env, fs, path::PathBuf};

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("kernels/ is missing")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    names.sort();
    let mut out = String::from(
        "/// Every kernel file: (name without .cu, source).\npub const KERNEL_FILES: &[(&str, &str)] = &[\n",
    );
    for n in &names {
        let path = dir.join(n);
        println!("cargo:rerun-if-changed={}", path.display());
        out.push_str(&format!(
            "    ({:?}, include_str!({:?})),\n",
            n.trim_end_matches(".cu"),
            path.display().to_string()
        ));
    }
    out.push_str("];\n");
    let common = dir.join("common.cuh");
    println!("cargo:rerun-if-changed={}", common.display());
    out.push_str(&format!(
        "/// Prepended to every kernel file.\npub const COMMON: &str = include_str!({:?});\n",
        common.display().to_string()
    ));
    fs::write(PathBuf::from(env::var("OUT_DIR").unwrap()).join("kernels.rs"), out).unwrap();
}
