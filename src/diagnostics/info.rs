//! `protege info`: what this machine offers protege — CPU, memory, GPUs (through NVML), the
//! CUDA driver and NVRTC, and where the CUDA libraries were found — or a plain statement that
//! no GPU was found.

use std::fmt::Write as _;

use crate::backend::cuda::{self, libs};

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn mem_total_gib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / (1024.0 * 1024.0))
}

/// CUDA driver API version as "major.minor".
fn driver_api_version() -> Option<String> {
    if !libs::probe().driver.present() {
        return None;
    }
    let mut v = 0i32;
    // SAFETY: the driver library is present (probed) and the pointer is valid.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (r == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then(|| format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// GPUs as NVML reports them; an error line when NVML is absent.
fn nvml_gpus(out: &mut String) -> usize {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(n) => n,
        Err(e) => {
            let _ = writeln!(out, "nvml      not available ({e})");
            return 0;
        }
    };
    if let Ok(v) = nvml.sys_driver_version() {
        let _ = writeln!(out, "driver    {v}");
    }
    let count = nvml.device_count().unwrap_or(0);
    for i in 0..count {
        let Ok(d) = nvml.device_by_index(i) else { continue };
        use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
        let name = d.name().unwrap_or_else(|_| "?".into());
        let mem = d.memory_info().map(|m| {
            format!("{:.1} GiB total, {:.1} GiB free", m.total as f64 / 1073741824.0, m.free as f64 / 1073741824.0)
        });
        let cc = d.cuda_compute_capability().map(|c| format!("sm_{}{}", c.major, c.minor));
        let sm = d.clock_info(Clock::SM).ok();
        let sm_max = d.max_clock_info(Clock::SM).ok();
        let memclk = d.max_clock_info(Clock::Memory).ok();
        let util = d.utilization_rates().map(|u| format!("{}% GPU, {}% memory", u.gpu, u.memory));
        let temp = d.temperature(TemperatureSensor::Gpu).ok();
        let power = d.power_usage().ok();
        let _ = writeln!(out, "gpu {i}     {name} ({})", cc.unwrap_or_else(|_| "?".into()));
        let _ = writeln!(out, "  memory  {}", mem.unwrap_or_else(|e| format!("? ({e})")));
        let _ = writeln!(
            out,
            "  clocks  SM {} MHz (max {} MHz), memory max {} MHz",
            sm.map_or("?".into(), |v| v.to_string()),
            sm_max.map_or("?".into(), |v| v.to_string()),
            memclk.map_or("?".into(), |v| v.to_string())
        );
        let _ = writeln!(
            out,
            "  now     {}{}{}",
            util.unwrap_or_else(|_| "utilisation ?".into()),
            temp.map_or(String::new(), |t| format!(", {t} C")),
            power.map_or(String::new(), |p| format!(", {:.0} W", p as f64 / 1000.0))
        );
    }
    count as usize
}

/// The report `protege info` prints.
pub fn report() -> String {
    let mut out = String::new();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let _ = writeln!(out, "protege   {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(out, "cpu       {} ({threads} threads)", cpu_model());
    if let Some(g) = mem_total_gib() {
        let _ = writeln!(out, "memory    {g:.1} GiB");
    }
    let _ = write!(out, "sandbox   {}", crate::sandbox::describe());
    let found = libs::probe();
    let _ = writeln!(out, "libcuda   {}", found.driver.describe());
    let _ = writeln!(out, "nvrtc     {}", found.nvrtc.describe());
    let _ = writeln!(out, "cublas    {}", found.cublas.describe());
    let _ = writeln!(out, "cublasLt  {}", found.cublaslt.describe());
    let _ = writeln!(out, "nccl      {} (multi-GPU data parallelism)", found.nccl.describe());
    let headers = libs::include_dirs();
    let _ = writeln!(
        out,
        "headers   {}",
        headers.first().map_or("cuda_bf16.h not found".to_string(), |d| d.display().to_string())
    );
    if found.nvrtc.present() {
        match cuda::nvrtc::version() {
            Ok((a, b)) => {
                let _ = writeln!(out, "nvrtc ver {a}.{b}");
            }
            Err(e) => {
                let _ = writeln!(out, "nvrtc ver ? ({e:#})");
            }
        }
    }
    if let Some(v) = driver_api_version() {
        let _ = writeln!(out, "cuda api  {v} (driver)");
    }
    let gpus = nvml_gpus(&mut out);
    let cuda_devices = cuda::device_count();
    if gpus == 0 && cuda_devices == 0 {
        let _ = writeln!(out, "No NVIDIA GPU was found: protege runs on the CPU backend (f32).");
    } else {
        let _ = writeln!(out, "cuda      {cuda_devices} device(s) usable through the driver API");
        if !found.backend_ready() {
            let _ = writeln!(out, "The CUDA backend cannot run: {}", cuda::nvrtc::missing_nvrtc_hint());
        }
    }
    let _ = writeln!(out, "default   --device {}", crate::backend::default_device());
    out
}
