//! A JSON-over-HTTP client for model APIs: a per-request timeout, retries with exponential
//! backoff on connection errors, timeouts, 429 and 5xx, and a clear error after the last try.
//! Header values (API keys) never appear in errors or logs.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Seconds before one request is abandoned.
    pub timeout_s: f64,
    /// Attempts in all, the first included.
    pub max_tries: usize,
    /// Wait before the second attempt; doubled for each further one.
    pub backoff_s: f64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { timeout_s: 120.0, max_tries: 4, backoff_s: 1.0 }
    }
}

pub struct JsonClient {
    client: reqwest::blocking::Client,
    cfg: HttpConfig,
}

/// Reads an API key from the environment variable `var`; `None` for no variable.
pub fn api_key(var: Option<&str>) -> Result<Option<String>> {
    match var {
        None => Ok(None),
        Some(v) => match std::env::var(v) {
            Ok(k) if !k.trim().is_empty() => Ok(Some(k)),
            _ => bail!("the API key variable {v} is not set (keys are read from the environment only)"),
        },
    }
}

impl JsonClient {
    pub fn new(cfg: HttpConfig) -> Result<Self> {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_s.max(0.001)))
            .build()
            .map_err(|e| anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Self { client, cfg })
    }

    /// POSTs `body` to `url` and returns the JSON reply.
    pub fn post(&self, url: &str, headers: &[(&str, String)], body: &Value) -> Result<Value> {
        let tries = self.cfg.max_tries.max(1);
        let mut last = String::new();
        for attempt in 0..tries {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs_f64(
                    self.cfg.backoff_s * (1u32 << (attempt - 1).min(16)) as f64,
                ));
            }
            let mut req = self.client.post(url).json(body);
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            match req.send() {
                Ok(resp) => {
                    let status = resp.status();
                    let text = resp.text().unwrap_or_default();
                    if status.is_success() {
                        return serde_json::from_str(&text)
                            .map_err(|e| anyhow!("{url} returned invalid JSON ({e}): {}", excerpt(&text)));
                    }
                    last = format!("HTTP {status}: {}", excerpt(&text));
                    if !(status.as_u16() == 429 || status.is_server_error()) {
                        bail!("{url} refused the request: {last}");
                    }
                }
                Err(e) if e.is_timeout() => last = format!("no reply within {:.0} s", self.cfg.timeout_s),
                Err(e) => last = without_url(&e),
            }
        }
        bail!("{url} failed after {tries} tries; last error: {last}")
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s.replace(u.as_str(), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn excerpt(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}
