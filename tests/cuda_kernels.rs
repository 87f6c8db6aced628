//! The CUDA kernels compile with NVRTC for sm_80 (A100) and sm_90 (H100) on a machine with no
//! GPU, and every function the backend launches is in the result. NVRTC and the CUDA headers
//! come from the CUDA toolkit when present, else from the `nvidia-cuda-nvrtc-cu12` and
//! `nvidia-cuda-runtime-cu12` wheels, which this test installs from PyPI into protege's cache
//! (`.ci/run` does the same up front).

use std::process::Command;

use protege::backend::cuda::{libs, nvrtc, KERNEL_FUNCTIONS};

/// Two tests change process-wide environment variables (the cache and library directories),
/// which the others read: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ensure_nvrtc() {
    if libs::find_library("nvrtc").is_some() && !libs::include_dirs().is_empty() {
        return;
    }
    let target = libs::wheel_dir();
    eprintln!("installing the NVRTC and CUDA runtime wheels into {}", target.display());
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target"])
        .arg(&target)
        .args(["nvidia-cuda-nvrtc-cu12==12.9.*", "nvidia-cuda-runtime-cu12==12.9.*"])
        .status()
        .expect("running python3 -m pip");
    assert!(status.success(), "pip could not install the NVRTC wheels into {}", target.display());
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let _serial = serial();
    ensure_nvrtc();
    let found = libs::probe();
    assert!(found.nvrtc.present(), "NVRTC not loadable: {}", nvrtc::missing_nvrtc_hint());
    let (major, minor) = nvrtc::version().unwrap();
    let includes = libs::include_dirs();
    eprintln!("NVRTC {major}.{minor} ({}), headers from {}", found.nvrtc.describe(), includes[0].display());
    for arch in ["sm_80", "sm_90"] {
        for (file, _) in nvrtc::KERNEL_FILES {
            let c = nvrtc::compile(file, arch, &includes).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(c.image.starts_with(b"\x7fELF"), "{file}.cu for {arch} is not a cubin");
            for (f, func) in KERNEL_FUNCTIONS.iter().filter(|(f, _)| f == file) {
                let needle = func.as_bytes();
                assert!(
                    c.image.windows(needle.len()).any(|w| w == needle),
                    "{func} missing from the {f}.cu cubin for {arch}"
                );
            }
            // ptxas' resource report, for the record (registers, spills, shared memory).
            for line in c.log.lines().filter(|l| l.contains("registers") || l.contains("spill")) {
                eprintln!("{arch} {file}: {}", line.trim());
            }
        }
    }
    for (file, _) in KERNEL_FUNCTIONS {
        assert!(nvrtc::KERNEL_FILES.iter().any(|(f, _)| f == file), "{file}.cu is not embedded");
    }
}

fn protege(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_protege")).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap()
}

/// Whether this machine can run the CUDA backend (then the no-GPU expectations do not apply).
fn gpu_here() -> bool {
    protege::backend::default_device() != protege::backend::Device::Cpu
}

#[test]
fn info_reports_the_machine_and_says_when_there_is_no_gpu() {
    let _serial = serial();
    let out = protege(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("cpu ") && text.contains("libcuda") && text.contains("default   --device"), "{text}");
    if !gpu_here() {
        assert!(text.contains("No NVIDIA GPU was found"), "{text}");
        assert!(text.contains("--device cpu"), "{text}");
    }
}

#[test]
fn without_a_gpu_cuda_commands_fail_clearly() {
    let _serial = serial();
    if gpu_here() {
        eprintln!("a GPU is present: the no-GPU error paths are not reachable here");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let out_dir = scratch.path().join("eval");
    let sft = scratch.path().join("sft.toml");
    std::fs::write(scratch.path().join("train.jsonl"), "").unwrap();
    let optim = "[optim]\nlr = 0.01\nwarmup_steps = 0\ndecay = \"cosine\"\nmin_lr_ratio = 0.1\nbeta1 = 0.9\n\
                 beta2 = 0.99\neps = 1e-8\nweight_decay = 0.0\nmax_grad_norm = 1.0\n";
    let text = format!(
        "[model]\npath = \"{}/tests/fixtures/tiny\"\n[data]\ntrain = [\"train.jsonl\"]\nmax_seq_len = 64\n\
         batch_tokens = 64\n[train]\nsteps = 1\n{optim}[output]\nrun_dir = \"run\"\n",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::write(&sft, text).unwrap();
    for args in [
        vec!["sft", "--config", sft.to_str().unwrap(), "--device", "cuda"],
        vec!["selftest", "--device", "cuda"],
        vec!["generate", "--model", "tests/fixtures/tiny", "--prompt", "hi", "--device", "cuda"],
        vec![
            "check-logits",
            "--model",
            "tests/fixtures/tiny",
            "--reference",
            "tests/fixtures/tiny/reference.safetensors",
            "--device",
            "cuda:1",
        ],
        vec!["bench", "--device", "cuda", "--kernels-only"],
        vec!["serve", "--model", "tests/fixtures/tiny", "--addr", "127.0.0.1:0", "--device", "cuda"],
        vec![
            "eval",
            "--suite",
            "tests/fixtures/tasks",
            "--policy",
            "local",
            "--model",
            "tests/fixtures/tiny",
            "--out",
            out_dir.to_str().unwrap(),
            "--device",
            "cuda",
        ],
    ] {
        let out = protege(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without a GPU");
        assert!(err.contains("no CUDA driver") && err.contains("--device cpu"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    let out = protege(&["bench"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model is required for the CPU benchmark"));
    let out = protege(&["generate", "--model", "tests/fixtures/tiny", "--prompt", "hi", "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected cpu, cuda or cuda:N"));
}

#[test]
fn selftest_harness_passes_with_the_cpu_as_the_device() {
    let _serial = serial();
    // The CPU backend against itself: every check must pass with (near) zero error, which
    // exercises the selftest's shape sweep, paged metadata, sampling statistics and model checks.
    let out = protege(&["selftest", "--device", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(" 0 failed"), "{text}");
    for group in ["attention", "rmsnorm", "linear", "rope", "sampling", "model", "greedy"] {
        assert!(text.contains(group), "no {group} checks:\n{text}");
    }
}

#[test]
fn compiled_kernels_are_cached_by_source_and_arch() {
    let _serial = serial();
    ensure_nvrtc();
    assert!(libs::probe().nvrtc.present()); // probed (and memoised) with the real cache
                                            // Headers found with the real cache; then the cache directory moves to a scratch one (it
                                            // is read per call, so the process-wide setting reaches compile_cached).
    let includes = libs::include_dirs();
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("PROTEGE_CACHE", cache.path());
    let (first, cached) = nvrtc::compile_cached("rmsnorm", "sm_80", &includes).unwrap();
    assert!(!cached && first.starts_with(b"\x7fELF"));
    let (again, cached) = nvrtc::compile_cached("rmsnorm", "sm_80", &includes).unwrap();
    assert!(cached, "the second compile must come from the cache");
    assert_eq!(first, again);
    let (_, cached) = nvrtc::compile_cached("rmsnorm", "sm_90", &includes).unwrap();
    assert!(!cached, "another architecture is another cache entry");
    let files: Vec<_> = std::fs::read_dir(cache.path().join("kernels")).unwrap().flatten().collect();
    assert_eq!(files.len(), 2, "{files:?}");
    // An empty (torn) entry is recompiled, not used.
    for f in &files {
        std::fs::write(f.path(), b"").unwrap();
    }
    let (image, cached) = nvrtc::compile_cached("rmsnorm", "sm_80", &includes).unwrap();
    assert!(!cached && image == first);
    std::env::remove_var("PROTEGE_CACHE");
}

#[test]
fn libraries_are_found_in_extra_directories_with_cuda_12_sonames() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    for f in ["libprotegefake.so.13", "libprotegefake.so.12", "libonlyunversioned.so"] {
        std::fs::write(dir.path().join(f), b"").unwrap();
    }
    std::env::set_var("PROTEGE_CUDA_LIBS", dir.path());
    assert_eq!(libs::find_library("protegefake"), Some(dir.path().join("libprotegefake.so.12")));
    assert_eq!(libs::find_library("onlyunversioned"), Some(dir.path().join("libonlyunversioned.so")));
    assert_eq!(libs::find_library("absentlibrary"), None);
    std::env::remove_var("PROTEGE_CUDA_LIBS");
}
