//! `protege launch`: the ranks of a data-parallel run on this machine, one per GPU, with
//! torchrun's environment.

use anyhow::{bail, Result};
use clap::Args;

use crate::launch::{launch, LaunchOptions};

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks (processes) on this machine; default: one per GPU.
    #[arg(long, visible_alias = "procs")]
    gpus: Option<usize>,
    /// Machines in the run.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This machine's index among them.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Address of the machine of rank 0.
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port rank 0 listens on (default: a free one; required with several machines).
    #[arg(long)]
    master_port: Option<u16>,
    /// The protege command every rank runs, after `--`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

pub fn run(a: LaunchArgs) -> Result<()> {
    let procs = match a.gpus {
        Some(n) => n,
        None => match crate::backend::cuda::device_count() {
            0 => bail!("no GPU found: say how many ranks to start with --gpus N"),
            n => n,
        },
    };
    launch(&LaunchOptions {
        procs,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        command: a.command,
    })
}
