//! `protege docker`: housekeeping of the Docker executor's containers.

use anyhow::Result;
use clap::Subcommand;

use crate::executor::docker::{DockerConfig, DockerExecutor};

#[derive(Subcommand)]
pub enum DockerCommand {
    /// Remove containers that killed protege runs left (`--all`: every protege container).
    Gc {
        #[arg(long)]
        all: bool,
        #[arg(long = "docker-host")]
        docker_hosts: Vec<String>,
    },
}

pub fn run(c: DockerCommand) -> Result<()> {
    match c {
        DockerCommand::Gc { all, docker_hosts } => {
            let d = DockerExecutor::connect(DockerConfig { hosts: docker_hosts, ..Default::default() })?;
            let n = d.gc(all)?;
            eprintln!("docker gc: removed {n} container(s)");
            Ok(())
        }
    }
}
