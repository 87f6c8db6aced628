//! `protege launch`: starts the ranks of a data-parallel run on this machine, one process per
//! GPU, with the environment torchrun gives its workers (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and waits for them. When one rank fails,
//! the others are stopped (they would wait for it forever) and the failure is reported.
//!
//! Several machines: run `protege launch --nnodes M --node-rank k --master-addr HOST
//! --master-port P --gpus N -- ...` on each (or let Slurm set `SLURM_PROCID`/`SLURM_NTASKS`/
//! `SLURM_LOCALID` and `MASTER_ADDR`/`MASTER_PORT` for one `protege` per GPU via `srun`).

use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub struct LaunchOptions {
    /// Ranks on this machine.
    pub procs: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    /// `None`: a free port on this machine (single-node runs only).
    pub master_port: Option<u16>,
    /// The protege command each rank runs (without the program name).
    pub command: Vec<String>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for MASTER_PORT")?;
    Ok(l.local_addr()?.port())
}

/// Runs the ranks to the end; an error names the first rank that failed.
pub fn launch(o: &LaunchOptions) -> Result<()> {
    if o.procs == 0 || o.nnodes == 0 {
        bail!("launch needs at least one rank per node and one node");
    }
    if o.node_rank >= o.nnodes {
        bail!("--node-rank {} is out of range for --nnodes {}", o.node_rank, o.nnodes);
    }
    if o.command.is_empty() {
        bail!("launch needs a command to run, e.g. `protege launch --gpus 8 -- sft --config run.toml`");
    }
    let port = match o.master_port {
        Some(p) => p,
        None if o.nnodes == 1 => free_port()?,
        None => bail!("--master-port is required with several nodes (every node must name the same one)"),
    };
    let world = o.procs * o.nnodes;
    let exe = std::env::current_exe().context("locating the protege binary")?;
    let mut children: Vec<(usize, Child)> = vec![];
    for local in 0..o.procs {
        let rank = o.node_rank * o.procs + local;
        let child = Command::new(&exe)
            .args(&o.command)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", o.procs.to_string())
            .env("MASTER_ADDR", &o.master_addr)
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push((rank, child));
    }
    eprintln!("launch: {} ranks on this node ({world} in all), MASTER_PORT {port}", o.procs);
    let mut failure: Option<String> = None;
    while !children.is_empty() {
        let mut i = 0;
        while i < children.len() {
            match children[i].1.try_wait()? {
                Some(status) => {
                    let (rank, _) = children.remove(i);
                    if !status.success() && failure.is_none() {
                        failure = Some(format!("rank {rank} failed ({status})"));
                        for (_, c) in children.iter_mut() {
                            let _ = c.kill();
                        }
                    }
                }
                None => i += 1,
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failure {
        Some(f) => bail!("{f}; the other ranks were stopped"),
        None => Ok(()),
    }
}
