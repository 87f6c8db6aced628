//! Data parallelism across processes, one per GPU: every rank trains on its share of each
//! step's micro-batches, gradients are summed across ranks (NCCL on GPUs, overlapped with the
//! backward layer by layer; a TCP star through rank 0 on the CPU), and the optimiser state is
//! sharded (ZeRO-1): each rank keeps moments and master weights only for the tensors it owns,
//! updates those, and broadcasts them.
//!
//! Ranks come from the usual environment — `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT` (torchrun's), or Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` when
//! those are absent — so torchrun-style and Slurm launchers work; `protege launch --gpus N`
//! starts N local ranks itself.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::backend::Backend;

/// This process's place in a data-parallel run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Rank within this machine: the GPU it uses.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl World {
    /// One process alone.
    pub fn single() -> Self {
        World { rank: 0, size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: 0 }
    }

    /// From the environment (see the module docs); a single process when nothing is set.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// As [`World::from_env`], reading variables through `get`.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let num = |keys: &[&str]| -> Result<Option<usize>> {
            for k in keys {
                if let Some(v) = get(k).filter(|v| !v.trim().is_empty()) {
                    return v.trim().parse().map(Some).with_context(|| format!("{k}={v:?} is not a whole number"));
                }
            }
            Ok(None)
        };
        let size = num(&["WORLD_SIZE", "SLURM_NTASKS"])?.unwrap_or(1);
        let rank = num(&["RANK", "SLURM_PROCID"])?.unwrap_or(0);
        let local_rank = num(&["LOCAL_RANK", "SLURM_LOCALID"])?.unwrap_or(rank);
        if size == 0 {
            bail!("WORLD_SIZE is 0: a run needs at least one rank");
        }
        if rank >= size {
            bail!("RANK {rank} is out of range for WORLD_SIZE {size}");
        }
        if size == 1 {
            return Ok(World { local_rank, ..World::single() });
        }
        let master_addr = get("MASTER_ADDR").filter(|v| !v.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        let port = get("MASTER_PORT").with_context(|| {
            format!("WORLD_SIZE is {size} but MASTER_PORT is not set: rank 0 listens there for the other ranks")
        })?;
        let master_port = port.trim().parse().with_context(|| format!("MASTER_PORT={port:?} is not a port number"))?;
        Ok(World { rank, size, local_rank, master_addr, master_port })
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// How long ranks wait for each other (connecting, and any one message): `PROTEGE_DIST_TIMEOUT`
/// seconds, default 600.
fn timeout() -> Duration {
    let s = std::env::var("PROTEGE_DIST_TIMEOUT").ok().and_then(|v| v.parse().ok()).unwrap_or(600u64);
    Duration::from_secs(s.max(1))
}

/// The TCP star through rank 0: the CPU collectives, host scalars (losses, token counts) and
/// the NCCL rendezvous travel on it.
pub struct Star {
    world: World,
    /// Rank 0: the stream of rank `i + 1` at `i`. Others: the stream to rank 0.
    links: Vec<TcpStream>,
}

fn send(s: &mut TcpStream, bytes: &[u8]) -> Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)?;
    Ok(())
}

fn recv(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len).context("a rank closed its connection (did it fail? see its output)")?;
    let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
    s.read_exact(&mut buf).context("a rank closed its connection mid-message")?;
    Ok(buf)
}

impl Star {
    /// Connects every rank to rank 0 (which listens on `MASTER_PORT`).
    pub fn connect(world: &World) -> Result<Self> {
        let mut links = vec![];
        if world.size > 1 {
            let deadline = Instant::now() + timeout();
            if world.is_main() {
                let listener = TcpListener::bind(("0.0.0.0", world.master_port))
                    .with_context(|| format!("rank 0 cannot listen on port {} (MASTER_PORT)", world.master_port))?;
                listener.set_nonblocking(true)?;
                let mut slots: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
                while slots.iter().any(Option::is_none) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            s.set_nonblocking(false)?;
                            s.set_read_timeout(Some(timeout()))?;
                            let r = u64::from_le_bytes(recv(&mut s)?.try_into().unwrap_or_default()) as usize;
                            if r == 0 || r >= world.size || slots[r - 1].is_some() {
                                bail!(
                                    "a peer announced rank {r}, which is invalid or taken (WORLD_SIZE {})",
                                    world.size
                                );
                            }
                            slots[r - 1] = Some(s);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if Instant::now() > deadline {
                                let missing: Vec<usize> =
                                    slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i + 1).collect();
                                bail!("ranks {missing:?} did not connect to rank 0 within {:?}", timeout());
                            }
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => return Err(e).context("accepting a rank's connection"),
                    }
                }
                links = slots.into_iter().map(|s| s.expect("all connected")).collect();
            } else {
                let addr = format!("{}:{}", world.master_addr, world.master_port);
                let mut s = loop {
                    match TcpStream::connect(&addr) {
                        Ok(s) => break s,
                        Err(e) if Instant::now() > deadline => {
                            return Err(e).with_context(|| format!("rank {} cannot reach rank 0 at {addr}", world.rank))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                };
                s.set_read_timeout(Some(timeout()))?;
                send(&mut s, &(world.rank as u64).to_le_bytes())?;
                links.push(s);
            }
            for l in &links {
                l.set_nodelay(true)?;
            }
        }
        Ok(Star { world: world.clone(), links })
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// Sums `v` across ranks, in rank order (so every run adds in the same order).
    pub fn all_reduce_f32(&mut self, v: &mut [f32]) -> Result<()> {
        let mut bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.all_reduce_raw(&mut bytes, |acc, other| {
            for (a, b) in acc.chunks_exact_mut(4).zip(other.chunks_exact(4)) {
                let s = f32::from_le_bytes(a.try_into().unwrap()) + f32::from_le_bytes(b.try_into().unwrap());
                a.copy_from_slice(&s.to_le_bytes());
            }
        })?;
        for (x, b) in v.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes(b.try_into().unwrap());
        }
        Ok(())
    }

    /// Sums host scalars across ranks.
    pub fn all_reduce_f64(&mut self, v: &mut [f64]) -> Result<()> {
        let mut bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.all_reduce_raw(&mut bytes, |acc, other| {
            for (a, b) in acc.chunks_exact_mut(8).zip(other.chunks_exact(8)) {
                let s = f64::from_le_bytes(a.try_into().unwrap()) + f64::from_le_bytes(b.try_into().unwrap());
                a.copy_from_slice(&s.to_le_bytes());
            }
        })?;
        for (x, b) in v.iter_mut().zip(bytes.chunks_exact(8)) {
            *x = f64::from_le_bytes(b.try_into().unwrap());
        }
        Ok(())
    }

    /// Rank 0 folds every rank's bytes into its own with `add`, in rank order, and sends the
    /// result back.
    fn all_reduce_raw(&mut self, bytes: &mut Vec<u8>, add: impl Fn(&mut [u8], &[u8])) -> Result<()> {
        if self.world.size == 1 {
            return Ok(());
        }
        if self.world.is_main() {
            for (i, l) in self.links.iter_mut().enumerate() {
                let other = recv(l)?;
                if other.len() != bytes.len() {
                    bail!("rank {} sent {} bytes to a collective, rank 0 has {}", i + 1, other.len(), bytes.len());
                }
                add(bytes, &other);
            }
            for l in &mut self.links {
                send(l, bytes)?;
            }
        } else {
            send(&mut self.links[0], bytes)?;
            let got = recv(&mut self.links[0])?;
            if got.len() != bytes.len() {
                bail!("rank 0 answered a collective with {} bytes, expected {}", got.len(), bytes.len());
            }
            *bytes = got;
        }
        Ok(())
    }

    /// Copies `bytes` from rank `root` to every rank (relayed through rank 0).
    pub fn broadcast_raw(&mut self, bytes: &mut Vec<u8>, root: usize) -> Result<()> {
        if self.world.size == 1 {
            return Ok(());
        }
        let me = self.world.rank;
        if me == 0 {
            if root != 0 {
                *bytes = recv(&mut self.links[root - 1])?;
            }
            for (i, l) in self.links.iter_mut().enumerate() {
                if i + 1 != root {
                    send(l, bytes)?;
                }
            }
        } else if me == root {
            send(&mut self.links[0], bytes)?;
        } else {
            *bytes = recv(&mut self.links[0])?;
        }
        Ok(())
    }

    /// Waits until every rank reaches this point.
    pub fn barrier(&mut self) -> Result<()> {
        self.all_reduce_f64(&mut [])
    }
}

/// Collective operations of a data-parallel run over one backend's buffers.
pub trait Collective<B: Backend> {
    fn world(&self) -> &World;
    /// Sums the first `n` values of each buffer across ranks, in place. A device collective
    /// may return before the sums are done; [`Collective::wait`] orders them before later work.
    fn all_reduce_sum(&mut self, be: &B, bufs: Vec<(&mut B::Buf, usize)>) -> Result<()>;
    /// Copies the first `n` values of `buf` from rank `root` to every rank.
    fn broadcast(&mut self, be: &B, buf: &mut B::Buf, n: usize, root: usize) -> Result<()>;
    /// Sums host scalars (losses, token counts) across ranks.
    fn all_reduce_host(&mut self, v: &mut [f64]) -> Result<()>;
    /// Makes later work on the backend wait for every collective enqueued so far.
    fn wait(&mut self, _be: &B) -> Result<()> {
        Ok(())
    }
    /// Waits until every rank reaches this point.
    fn barrier(&mut self) -> Result<()>;
}

/// Collectives through host memory over the TCP star: any backend (the CPU's transport; on
/// GPUs a fallback where NCCL is missing).
pub struct HostCollective {
    star: Star,
}

impl HostCollective {
    pub fn new(star: Star) -> Self {
        Self { star }
    }
}

impl<B: Backend> Collective<B> for HostCollective {
    fn world(&self) -> &World {
        self.star.world()
    }

    fn all_reduce_sum(&mut self, be: &B, bufs: Vec<(&mut B::Buf, usize)>) -> Result<()> {
        if self.star.world.size == 1 || bufs.is_empty() {
            return Ok(());
        }
        let mut flat: Vec<f32> = Vec::with_capacity(bufs.iter().map(|(_, n)| n).sum());
        for (b, n) in &bufs {
            flat.extend_from_slice(&be.to_f32(b)[..*n]);
        }
        self.star.all_reduce_f32(&mut flat)?;
        let mut at = 0;
        for (b, n) in bufs {
            be.write_f32(b, &flat[at..at + n]);
            at += n;
        }
        Ok(())
    }

    fn broadcast(&mut self, be: &B, buf: &mut B::Buf, n: usize, root: usize) -> Result<()> {
        if self.star.world.size == 1 {
            return Ok(());
        }
        let mut bytes: Vec<u8> = if self.star.world.rank == root {
            be.to_f32(buf)[..n].iter().flat_map(|x| x.to_le_bytes()).collect()
        } else {
            vec![]
        };
        self.star.broadcast_raw(&mut bytes, root)?;
        if self.star.world.rank != root {
            if bytes.len() != n * 4 {
                bail!("broadcast from rank {root}: {} bytes, expected {}", bytes.len(), n * 4);
            }
            let vals: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            be.write_f32(buf, &vals);
        }
        Ok(())
    }

    fn all_reduce_host(&mut self, v: &mut [f64]) -> Result<()> {
        self.star.all_reduce_f64(v)
    }

    fn barrier(&mut self) -> Result<()> {
        self.star.barrier()
    }
}

/// Which rank owns (keeps the optimiser state of, and updates) each trained tensor: the
/// largest first, each to the least-loaded rank, so the shards hold about equal values.
pub fn shard_owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(sizes[i]), i));
    let mut load = vec![0usize; world.max(1)];
    let mut owner = vec![0; sizes.len()];
    for i in order {
        let r = (0..load.len()).min_by_key(|&r| (load[r], r)).unwrap();
        owner[i] = r;
        load[r] += sizes[i];
    }
    owner
}

/// NCCL collectives on their own CUDA stream, so a layer's gradient all-reduce overlaps the
/// backward of the layers before it.
pub mod nccl {
    use std::sync::Arc;

    use anyhow::{bail, Context, Result};
    use cudarc::driver::CudaStream;
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};

    use super::{Collective, Star, World};
    use crate::backend::cuda::{libs, CudaBackend, CudaBuf};

    pub struct NcclCollective {
        star: Star,
        comm: Comm,
        stream: Arc<CudaStream>,
    }

    fn nccl_err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
        anyhow::anyhow!("NCCL {what} failed: {e:?}")
    }

    impl NcclCollective {
        /// Creates the communicator: rank 0 makes the NCCL id and sends it over the TCP star.
        pub fn new(be: &CudaBackend, mut star: Star) -> Result<Self> {
            if !libs::probe().nccl.present() {
                bail!("libnccl was not found: install nvidia-nccl-cu12 (PyTorch's environment has it) or NCCL itself");
            }
            let world = star.world().clone();
            let mut bytes: Vec<u8> = if world.is_main() {
                let id = Id::new().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
                id.internal().iter().map(|&c| c as u8).collect()
            } else {
                vec![]
            };
            star.broadcast_raw(&mut bytes, 0)?;
            let internal: [std::ffi::c_char; 128] = bytes
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| anyhow::anyhow!("the NCCL id from rank 0 has {} bytes, expected 128", bytes.len()))?;
            let stream = be.stream().fork().context("creating the NCCL stream")?;
            let comm = Comm::from_rank(stream.clone(), world.rank, world.size, Id::uninit(internal))
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            Ok(Self { star, comm, stream })
        }
    }

    impl Collective<CudaBackend> for NcclCollective {
        fn world(&self) -> &World {
            self.star.world()
        }

        fn all_reduce_sum(&mut self, be: &CudaBackend, bufs: Vec<(&mut CudaBuf, usize)>) -> Result<()> {
            // The sums start once the compute stream has produced the gradients.
            self.stream.join(be.stream()).context("ordering the NCCL stream after the backward")?;
            for (b, n) in bufs {
                match b {
                    CudaBuf::F32(s) => self.comm.all_reduce_in_place(&mut s.slice_mut(..n), &ReduceOp::Sum),
                    CudaBuf::Bf16(s) => self.comm.all_reduce_in_place(&mut s.slice_mut(..n), &ReduceOp::Sum),
                }
                .map_err(|e| nccl_err("all-reduce", e))?;
            }
            Ok(())
        }

        fn broadcast(&mut self, be: &CudaBackend, buf: &mut CudaBuf, n: usize, root: usize) -> Result<()> {
            self.stream.join(be.stream()).context("ordering the NCCL stream")?;
            match buf {
                CudaBuf::F32(s) => self.comm.broadcast_in_place(&mut s.slice_mut(..n), root as i32),
                CudaBuf::Bf16(s) => self.comm.broadcast_in_place(&mut s.slice_mut(..n), root as i32),
            }
            .map_err(|e| nccl_err("broadcast", e))?;
            Ok(())
        }

        fn all_reduce_host(&mut self, v: &mut [f64]) -> Result<()> {
            self.star.all_reduce_f64(v)
        }

        fn wait(&mut self, be: &CudaBackend) -> Result<()> {
            be.stream().join(&self.stream).context("waiting for NCCL")
        }

        fn barrier(&mut self) -> Result<()> {
            self.star.barrier()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_from_torchrun_and_slurm_variables() {
        let vars = |pairs: &'static [(&str, &str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::single());
        let w = World::from_vars(vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_addr.as_str(), w.master_port), (3, 8, 1, "node0", 29500));
        let s = World::from_vars(vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "5"),
            ("MASTER_PORT", "1234"),
        ]))
        .unwrap();
        assert_eq!((s.rank, s.size, s.local_rank, s.master_addr.as_str()), (5, 16, 5, "127.0.0.1"));
        let e = World::from_vars(vars(&[("RANK", "1"), ("WORLD_SIZE", "2")])).unwrap_err().to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
        let e = World::from_vars(vars(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let e = World::from_vars(vars(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(format!("{e:#}").contains("WORLD_SIZE"), "{e}");
    }

    #[test]
    fn shards_balance_by_size_and_are_deterministic() {
        let sizes = [100, 1, 60, 50, 3, 40];
        let o = shard_owners(&sizes, 2);
        let load = |r| sizes.iter().zip(&o).filter(|(_, &x)| x == r).map(|(s, _)| s).sum::<usize>();
        assert_eq!(load(0) + load(1), 254);
        // Largest first to the least loaded: 100 | 60, 50 | 40 (to rank 0) | 3, 1 (to rank 1).
        assert_eq!(o, vec![0, 1, 1, 1, 1, 0]);
        assert!(load(0).max(load(1)) <= 254 / 2 + 100, "greedy bound: {o:?}");
        assert_eq!(o, shard_owners(&sizes, 2));
        assert!(shard_owners(&sizes, 1).iter().all(|&r| r == 0));
    }

    #[test]
    fn star_collectives_across_threads() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world =
                        World { rank, size: 3, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port };
                    let mut star = Star::connect(&world).unwrap();
                    let mut v = vec![rank as f32, 1.0, 0.5 * rank as f32];
                    star.all_reduce_f32(&mut v).unwrap();
                    let mut s = [rank as f64 + 0.25];
                    star.all_reduce_f64(&mut s).unwrap();
                    let mut b = if rank == 2 { vec![7u8, 8, 9] } else { vec![] };
                    star.broadcast_raw(&mut b, 2).unwrap();
                    star.barrier().unwrap();
                    (v, s[0], b)
                })
            })
            .collect();
        for h in handles {
            let (v, s, b) = h.join().unwrap();
            assert_eq!(v, vec![3.0, 3.0, 1.5]);
            assert_eq!(s, 3.75);
            assert_eq!(b, vec![7, 8, 9]);
        }
    }
}
