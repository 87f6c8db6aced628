//! Docker hosts and their slots: a local socket, `tcp://` (TLS from `DOCKER_CERT_PATH` when
//! `DOCKER_TLS_VERIFY` is set, as the docker CLI does), `ssh://user@host` (through the system's
//! `ssh`), or `DOCKER_HOST`. Episodes go to the least-loaded host with a free slot; a host that
//! stops answering is taken out with a message and its episode retried elsewhere.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bollard::Docker;

/// Seconds a single API request may take (our own timeouts bound commands; a grading run may
/// stream for half an hour).
const REQUEST_TIMEOUT_S: u64 = 4 * 3600;

/// One host: `URL` or `URL=SLOTS`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostSpec {
    pub url: String,
    pub slots: usize,
}

impl std::str::FromStr for HostSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (url, slots) = match s.rsplit_once('=') {
            Some((u, n)) => (u, n.parse().with_context(|| format!("docker host {s:?}: slots {n:?} is not a number"))?),
            None => (s, default_slots()),
        };
        if !["unix://", "tcp://", "http://", "https://", "ssh://"].iter().any(|p| url.starts_with(p)) {
            bail!("docker host {url:?}: expected unix://PATH, tcp://HOST:PORT or ssh://[USER@]HOST");
        }
        if slots == 0 {
            bail!("docker host {url:?}: slots must be at least 1");
        }
        Ok(HostSpec { url: url.to_string(), slots })
    }
}

pub fn default_slots() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
}

/// The host of `DOCKER_HOST`, or the local socket.
pub fn default_host() -> HostSpec {
    let url = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    HostSpec { url, slots: default_slots() }
}

pub fn connect(spec: &HostSpec) -> Result<Docker> {
    let v = bollard::API_DEFAULT_VERSION;
    let d = if spec.url.starts_with("unix://") {
        Docker::connect_with_unix(&spec.url, REQUEST_TIMEOUT_S, v)
    } else if spec.url.starts_with("ssh://") {
        Docker::connect_with_ssh(&spec.url, REQUEST_TIMEOUT_S, v, None)
    } else if spec.url.starts_with("https://") || std::env::var_os("DOCKER_TLS_VERIFY").is_some() {
        let dir = std::env::var_os("DOCKER_CERT_PATH")
            .map(std::path::PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))
            .context("TLS needs DOCKER_CERT_PATH (ca.pem, cert.pem, key.pem)")?;
        Docker::connect_with_ssl(
            &spec.url,
            &dir.join("key.pem"),
            &dir.join("cert.pem"),
            &dir.join("ca.pem"),
            REQUEST_TIMEOUT_S,
            v,
        )
    } else {
        Docker::connect_with_http(&spec.url, REQUEST_TIMEOUT_S, v)
    };
    d.with_context(|| format!("docker host {}", spec.url))
}

/// Whether an error means the host is gone (no answer), rather than an answer we dislike.
pub fn host_failure(e: &bollard::errors::Error) -> bool {
    use bollard::errors::Error as E;
    matches!(
        e,
        E::IOError { .. }
            | E::HyperResponseError { .. }
            | E::HyperLegacyError { .. }
            | E::RequestTimeoutError
            | E::SocketNotFoundError(_)
            | E::HttpClientError { .. }
    )
}

pub struct Host {
    pub spec: HostSpec,
    pub docker: Docker,
}

/// The hosts and their loads.
pub struct Pool {
    pub hosts: Vec<Host>,
    state: Mutex<State>,
    freed: Condvar,
}

struct State {
    load: Vec<usize>,
    /// Why a host was taken out.
    down: Vec<Option<String>>,
}

/// A slot held on one host, given back when dropped.
pub struct Lease<'p> {
    pool: &'p Pool,
    pub host: usize,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let mut s = self.pool.state.lock().expect("lock");
        s.load[self.host] -= 1;
        self.pool.freed.notify_all();
    }
}

impl Pool {
    pub fn new(hosts: Vec<Host>) -> Self {
        let n = hosts.len();
        Pool { hosts, state: Mutex::new(State { load: vec![0; n], down: vec![None; n] }), freed: Condvar::new() }
    }

    /// A slot on the least-loaded host that is up (waits for one while all are busy).
    pub fn acquire(&self) -> Result<Lease<'_>> {
        let mut s = self.state.lock().expect("lock");
        loop {
            if s.down.iter().all(|d| d.is_some()) {
                let why: Vec<String> = self
                    .hosts
                    .iter()
                    .zip(&s.down)
                    .map(|(h, d)| format!("{}: {}", h.spec.url, d.clone().unwrap_or_default()))
                    .collect();
                bail!("every docker host is out: {}", why.join("; "));
            }
            let best = (0..self.hosts.len())
                .filter(|&i| s.down[i].is_none() && s.load[i] < self.hosts[i].spec.slots)
                .min_by(|&a, &b| {
                    let la = s.load[a] as f64 / self.hosts[a].spec.slots as f64;
                    let lb = s.load[b] as f64 / self.hosts[b].spec.slots as f64;
                    la.total_cmp(&lb)
                });
            if let Some(i) = best {
                s.load[i] += 1;
                return Ok(Lease { pool: self, host: i });
            }
            if crate::interrupt::requested() {
                bail!("interrupted");
            }
            s = self.freed.wait_timeout(s, Duration::from_millis(200)).expect("lock").0;
        }
    }

    /// Takes a host out (once, with a message).
    pub fn take_out(&self, host: usize, why: &str) {
        let mut s = self.state.lock().expect("lock");
        if s.down[host].is_none() {
            eprintln!("docker host {} taken out: {why}; its episodes go to the other hosts", self.hosts[host].spec.url);
            s.down[host] = Some(why.to_string());
        }
        self.freed.notify_all();
    }

    pub fn up(&self) -> Vec<usize> {
        let s = self.state.lock().expect("lock");
        (0..self.hosts.len()).filter(|&i| s.down[i].is_none()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_specs_parse_and_fail_clearly() {
        let h: HostSpec = "ssh://me@gpu2=16".parse().unwrap();
        assert_eq!((h.url.as_str(), h.slots), ("ssh://me@gpu2", 16));
        assert!("gpu2".parse::<HostSpec>().unwrap_err().to_string().contains("expected unix://"));
        assert!("tcp://h:2375=x".parse::<HostSpec>().unwrap_err().to_string().contains("not a number"));
    }

    #[test]
    fn least_loaded_host_first_and_a_host_taken_out() {
        let mk = |url: &str, slots| Host {
            spec: HostSpec { url: url.into(), slots },
            docker: Docker::connect_with_http("tcp://127.0.0.1:1", 1, bollard::API_DEFAULT_VERSION).unwrap(),
        };
        let pool = Pool::new(vec![mk("tcp://a:1", 1), mk("tcp://b:1", 3)]);
        let l1 = pool.acquire().unwrap();
        let l2 = pool.acquire().unwrap();
        let l3 = pool.acquire().unwrap();
        // a: 0/1 then 1/1; b takes the next ones (1/3 < 1/1).
        let mut hosts = vec![l1.host, l2.host, l3.host];
        hosts.sort();
        assert_eq!(hosts, vec![0, 1, 1]);
        pool.take_out(1, "gone");
        drop((l1, l2, l3));
        assert_eq!(pool.acquire().unwrap().host, 0);
        pool.take_out(0, "gone too");
        assert!(pool.acquire().err().unwrap().to_string().contains("every docker host is out"));
    }
}
