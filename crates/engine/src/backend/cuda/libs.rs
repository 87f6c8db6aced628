//! Finding the CUDA libraries and headers at run time.
//!
//! cudarc loads libcuda, libnvrtc, libcublas and libcublasLt with `dlopen` by name and panics
//! when one is missing, so every use is preceded by a probe. Besides the loader's own search
//! path, libraries are looked for where CUDA usually lives: `$CUDA_HOME`/`$CUDA_PATH`,
//! `/usr/local/cuda`, the NVIDIA wheels of a Python environment (`site-packages/nvidia/*/lib`,
//! as PyTorch installs them) and protege's cache (`$PROTEGE_CACHE/cuda/py`, where the tests
//! install the NVRTC wheels). A library found that way is loaded by its full path first; the
//! loader then resolves cudarc's `dlopen("libX.so.12")` to it by its soname.

use std::path::PathBuf;
use std::sync::OnceLock;

/// protege's cache directory (`$PROTEGE_CACHE`, default `~/.cache/protege`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("PROTEGE_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache/protege"),
    }
}

/// Where the NVRTC and CUDA runtime wheels are installed for protege (`pip install --target`).
pub fn wheel_dir() -> PathBuf {
    cache_dir().join("cuda/py")
}

/// Roots under which `lib64`/`lib` and `include` are searched, most specific first.
fn roots() -> Vec<PathBuf> {
    let mut roots = vec![];
    for var in ["PROTEGE_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            roots.push(PathBuf::from(p));
        }
    }
    roots.push("/usr/local/cuda".into());
    roots
}

/// `nvidia/<component>` directories of Python environments (PyTorch's CUDA wheels) and of
/// protege's own wheel directory.
fn wheel_components() -> Vec<PathBuf> {
    let mut bases = vec![wheel_dir()];
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut parents: Vec<PathBuf> = vec!["/usr/lib".into(), "/usr/local/lib".into(), "/opt/conda/lib".into()];
    if let Some(h) = &home {
        parents.push(h.join(".local/lib"));
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").or_else(|| std::env::var_os("CONDA_PREFIX")) {
        parents.push(PathBuf::from(v).join("lib"));
    }
    for parent in parents {
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sub in ["site-packages", "dist-packages"] {
                    bases.push(e.path().join(sub));
                }
            }
        }
    }
    let mut out = vec![];
    for b in bases {
        let Ok(entries) = std::fs::read_dir(b.join("nvidia")) else { continue };
        let mut comps: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        comps.sort();
        out.extend(comps);
    }
    out
}

/// Directories that may hold CUDA shared libraries.
pub fn lib_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![];
    if let Some(extra) = std::env::var_os("PROTEGE_CUDA_LIBS") {
        dirs.extend(std::env::split_paths(&extra));
    }
    for r in roots() {
        dirs.push(r.join("lib64"));
        dirs.push(r.join("lib"));
    }
    dirs.extend(wheel_components().into_iter().map(|c| c.join("lib")));
    dirs.push("/usr/lib/x86_64-linux-gnu".into());
    dirs.push("/usr/lib64".into());
    dirs.retain(|d| d.is_dir());
    dirs
}

/// Directories holding `cuda_bf16.h` (NVRTC needs the CUDA headers to compile bf16 code).
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = roots().into_iter().map(|r| r.join("include")).collect();
    dirs.extend(wheel_components().into_iter().map(|c| c.join("include")));
    dirs.retain(|d| d.join("cuda_bf16.h").is_file());
    dirs
}

/// Where `lib<name>` would be loaded from by path (None: not in any known directory).
pub fn find_library(name: &str) -> Option<PathBuf> {
    candidates(&lib_dirs(), name).into_iter().next()
}

/// Every file in `dirs` named `lib<name>.so.12`, `.so.1` (libcuda, libnvToolsExt) or `.so`, in
/// search order: the sonames the CUDA 12 bindings of cudarc open.
fn candidates(dirs: &[PathBuf], name: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    for d in dirs {
        for file in
            [format!("lib{name}.so.12"), format!("lib{name}.so.1"), format!("lib{name}.so.2"), format!("lib{name}.so")]
        {
            let p = d.join(file);
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// The outcome of looking for one library.
#[derive(Debug, Clone)]
pub enum Found {
    /// The loader finds it by name.
    System,
    /// Loaded from this path.
    Path(PathBuf),
    Missing,
}

impl Found {
    pub fn present(&self) -> bool {
        !matches!(self, Found::Missing)
    }

    pub fn describe(&self) -> String {
        match self {
            Found::System => "found by the loader".into(),
            Found::Path(p) => format!("loaded from {}", p.display()),
            Found::Missing => "not found".into(),
        }
    }
}

/// Makes `lib<name>` loadable by name for cudarc, once per process.
fn ensure(name: &str, by_name: fn() -> bool) -> Found {
    if by_name() {
        return Found::System;
    }
    for path in candidates(&lib_dirs(), name) {
        // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
        if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
            // Kept loaded for the life of the process, so cudarc's dlopen by soname finds it.
            std::mem::forget(lib);
            if by_name() {
                return Found::Path(path);
            }
        }
    }
    Found::Missing
}

/// What was found, probed once per process.
#[derive(Debug, Clone)]
pub struct Libraries {
    pub driver: Found,
    pub nvrtc: Found,
    pub cublas: Found,
    pub cublaslt: Found,
    /// libnvToolsExt, for NVTX ranges (optional).
    pub nvtx: Found,
    /// libnccl, for multi-GPU data parallelism (optional; PyTorch's nvidia-nccl-cu12 wheel has it).
    pub nccl: Found,
}

impl Libraries {
    /// The libraries the CUDA backend needs are all there.
    pub fn backend_ready(&self) -> bool {
        self.driver.present() && self.nvrtc.present() && self.cublas.present() && self.cublaslt.present()
    }
}

pub fn probe() -> &'static Libraries {
    static LIBS: OnceLock<Libraries> = OnceLock::new();
    LIBS.get_or_init(|| {
        // SAFETY (all four): `is_culib_present` only tries to dlopen the library's names.
        // cuBLAS needs cuBLASLt loaded first (it links against it by soname).
        let cublaslt = ensure("cublasLt", || unsafe { cudarc::cublaslt::sys::is_culib_present() });
        Libraries {
            driver: ensure("cuda", || unsafe { cudarc::driver::sys::is_culib_present() }),
            nvrtc: ensure("nvrtc", || unsafe { cudarc::nvrtc::sys::is_culib_present() }),
            cublas: ensure("cublas", || unsafe { cudarc::cublas::sys::is_culib_present() }),
            cublaslt,
            nvtx: ensure("nvToolsExt", || unsafe { cudarc::nvtx::sys::is_culib_present() }),
            nccl: ensure("nccl", || unsafe { cudarc::nccl::sys::is_culib_present() }),
        }
    })
}
