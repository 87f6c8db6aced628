//! Compiling the embedded kernels with NVRTC, cached on disk.
//!
//! Each `kernels/*.cu` file (with `common.cuh` prepended) is one module, compiled for the
//! device's architecture straight to a cubin (`-arch=sm_XY`): a cubin from a newer 12.x NVRTC
//! loads on an older 12.x driver, which PTX would not. Results are cached under
//! `$PROTEGE_CACHE/kernels/` by a hash of the source, the options and the NVRTC version, so a
//! run compiles only what changed.

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use super::libs;

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The source NVRTC sees for kernel file `name`: the shared header, then the file.
pub fn full_source(name: &str) -> Result<String> {
    let (_, src) =
        KERNEL_FILES.iter().find(|(n, _)| *n == name).with_context(|| format!("no kernel file {name}.cu"))?;
    Ok(format!("{COMMON}\n#line 1 \"{name}.cu\"\n{src}"))
}

/// NVRTC's version, e.g. (12, 9). Requires [`libs::probe`] to have found NVRTC.
pub fn version() -> Result<(i32, i32)> {
    if !libs::probe().nvrtc.present() {
        bail!("NVRTC (libnvrtc) was not found: {}", missing_nvrtc_hint());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both pointers are valid for the call.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }.result().context("nvrtcVersion failed")?;
    Ok((major, minor))
}

pub fn missing_nvrtc_hint() -> String {
    format!(
        "install the CUDA toolkit, or `pip install --target {} nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12`, \
         or point PROTEGE_CUDA_LIBS at the directory holding libnvrtc.so.12",
        libs::wheel_dir().display()
    )
}

/// What a compilation produced.
pub struct Compiled {
    /// A cubin for `sm_XY`, or PTX text for `compute_XY`.
    pub image: Vec<u8>,
    pub log: String,
}

fn options(arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
        "-default-device".to_string(),
        "-lineinfo".to_string(),          // source lines in Nsight Compute
        "--ptxas-options=-v".to_string(), // registers and spills in the log
    ];
    o.extend(include_dirs.iter().map(|d| format!("--include-path={}", d.display())));
    o
}

/// Compiles kernel file `name` for `arch` (`sm_90` gives a cubin, `compute_90` PTX).
pub fn compile(name: &str, arch: &str, include_dirs: &[PathBuf]) -> Result<Compiled> {
    if !libs::probe().nvrtc.present() {
        bail!("NVRTC (libnvrtc) was not found: {}", missing_nvrtc_hint());
    }
    if include_dirs.is_empty() {
        bail!(
            "the CUDA headers (cuda_bf16.h) were not found: set CUDA_HOME, or install nvidia-cuda-runtime-cu12 \
             into {}",
            libs::wheel_dir().display()
        );
    }
    let src = CString::new(full_source(name)?).context("kernel source contains a NUL byte")?;
    let prog_name = CString::new(format!("{name}.cu")).unwrap();
    let prog = nvrtc_result::create_program(&src, Some(&prog_name))
        .with_context(|| format!("nvrtcCreateProgram for {name}.cu"))?;
    let opts = options(arch, include_dirs);
    // SAFETY: `prog` is a live program; it is destroyed below on every path.
    let outcome = unsafe { nvrtc_result::compile_program(prog, &opts) };
    let log = unsafe { nvrtc_result::get_program_log(prog) }
        .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
        .unwrap_or_default();
    let image = match outcome {
        Err(e) => {
            unsafe { nvrtc_result::destroy_program(prog) }.ok();
            bail!("NVRTC could not compile {name}.cu for {arch} ({e:?}):\n{log}");
        }
        Ok(()) if arch.starts_with("sm_") => unsafe { cubin(prog) },
        // PTX text keeps its terminating NUL: cuModuleLoadData reads it as a C string.
        Ok(()) => unsafe { nvrtc_result::get_ptx(prog) }
            .map(|p| {
                let mut v: Vec<u8> = p.into_iter().take_while(|&c| c != 0).map(|c| c as u8).collect();
                v.push(0);
                v
            })
            .map_err(|e| anyhow::anyhow!("nvrtcGetPTX: {e:?}")),
    };
    unsafe { nvrtc_result::destroy_program(prog) }.ok();
    Ok(Compiled { image: image.with_context(|| format!("reading the compiled {name}.cu"))?, log })
}

/// # Safety
/// `prog` must be a successfully compiled program.
unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| anyhow::anyhow!("nvrtcGetCUBINSize: {e:?}"))?;
    let mut buf = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char)
        .result()
        .map_err(|e| anyhow::anyhow!("nvrtcGetCUBIN: {e:?}"))?;
    Ok(buf)
}

/// 64-bit FNV-1a: a stable cache key (not a security boundary).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in *p {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache file of kernel file `name` for `arch`.
fn cache_path(name: &str, arch: &str) -> Result<PathBuf> {
    let (major, minor) = version()?;
    let src = full_source(name)?;
    let key = fnv1a(&[src.as_bytes(), options(arch, &[]).join(" ").as_bytes(), format!("{major}.{minor}").as_bytes()]);
    let ext = if arch.starts_with("sm_") { "cubin" } else { "ptx" };
    Ok(libs::cache_dir().join("kernels").join(format!("{name}-{arch}-{key:016x}.{ext}")))
}

/// Writes a compiled image to the cache; a cache that cannot be written only costs a
/// recompile next time.
pub fn store_cached(name: &str, arch: &str, image: &[u8]) {
    let Ok(path) = cache_path(name, arch) else { return };
    if let Some(dir) = path.parent() {
        if std::fs::create_dir_all(dir).is_ok() {
            let _ = crate::util::write_atomic(&path, image);
        }
    }
}

/// [`compile`] through the disk cache: returns the image and whether it came from the cache.
pub fn compile_cached(name: &str, arch: &str, include_dirs: &[PathBuf]) -> Result<(Vec<u8>, bool)> {
    let path = cache_path(name, arch)?;
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok((bytes, true));
        }
    }
    let c = compile(name, arch, include_dirs)?;
    store_cached(name, arch, &c.image);
    Ok((c.image, false))
}
