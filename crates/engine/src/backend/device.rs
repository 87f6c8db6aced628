//! Which device a command runs on, and one place that turns a device into its backend.

use anyhow::{bail, Result};

/// Which device a command runs its model on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("unknown device {s:?}: expected cpu, cuda or cuda:N"),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The device used when none is named: the first GPU when the CUDA backend can run, else the CPU.
pub fn default_device() -> Device {
    if super::cuda::libs::probe().backend_ready() && super::cuda::device_count() > 0 {
        Device::Cuda(0)
    } else {
        Device::Cpu
    }
}

/// Runs `$body` with `$be` bound to the backend of `$device` (a [`Device`]): the CPU backend, or
/// the CUDA backend of that GPU (an error when it cannot start). Each backend gets its own
/// monomorphised copy of the body, so generic code over `B: Backend` is written once and every
/// command picks its device here rather than in a hand-written match.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$be:ident| $body:expr) => {{
        match $device {
            $crate::backend::Device::Cpu => {
                let $be = $crate::backend::cpu::CpuBackend::new();
                $body
            }
            $crate::backend::Device::Cuda(ordinal) => {
                let $be = $crate::backend::cuda::CudaBackend::new(ordinal)?;
                $body
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (text, d) in [("cpu", Device::Cpu), ("cuda", Device::Cuda(0)), ("cuda:3", Device::Cuda(3))] {
            assert_eq!(text.parse::<Device>().unwrap(), d);
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        let e = "gpu".parse::<Device>().unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda or cuda:N"), "{e}");
    }

    #[test]
    fn with_backend_runs_the_body_on_the_cpu() -> Result<()> {
        use crate::backend::Backend;
        let name = crate::with_backend!(Device::Cpu, |be| be.name());
        assert!(name.to_lowercase().contains("cpu"), "{name}");
        Ok(())
    }
}
