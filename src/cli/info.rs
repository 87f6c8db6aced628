//! `protege info`: what this machine offers (CPU, memory, GPUs, CUDA driver, NVRTC, libraries).

use anyhow::Result;

pub fn run() -> Result<()> {
    print!("{}", crate::diagnostics::info::report());
    Ok(())
}
