//! Calls to upstream HTTP APIs, with one mapping from what went wrong to [`MintError`]:
//! 401/403 mean the upstream refused the broker ([`MintError::Refused`]); timeouts,
//! connection failures, 429 and 5xx mean it is unavailable ([`MintError::Upstream`],
//! with `Retry-After` when given). Response bodies never reach an error message: they
//! may hold credentials.

use super::MintError;
use serde::de::DeserializeOwned;
use std::time::Duration;

/// Largest upstream answer read.
const MAX_BODY: usize = 1 << 20;

/// An HTTP client for one target.
#[derive(Debug, Clone)]
pub(crate) struct Http {
    target: String,
    client: reqwest::Client,
}

impl Http {
    /// A client with `timeout` per request that never follows redirects (a redirect
    /// would carry the broker's credential somewhere else). Fails only when the TLS
    /// backend cannot start.
    pub(crate) fn new(target: &str, timeout: Duration) -> Result<Http, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        Ok(Http {
            target: target.to_string(),
            client,
        })
    }

    /// The underlying client, to build requests.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    fn unavailable(&self, reason: String) -> MintError {
        MintError::Upstream {
            target: self.target.clone(),
            reason,
        }
    }

    /// Sends `req`; answers the status and body of a 2xx answer, or of a status listed in
    /// `also_ok` (404 for idempotent deletes). `what` names the call in errors.
    pub(crate) async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
        also_ok: &[u16],
    ) -> Result<(u16, Vec<u8>), MintError> {
        let resp = req.send().await.map_err(|e| {
            self.unavailable(if e.is_timeout() {
                format!("{what}: timed out")
            } else if e.is_connect() {
                format!("{what}: cannot connect")
            } else {
                format!("{what}: request failed")
            })
        })?;
        let status = resp.status().as_u16();
        if resp.status().is_success() || also_ok.contains(&status) {
            if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
                return Err(self.unavailable(format!("{what}: answer too large")));
            }
            let body = resp.bytes().await.map_err(|e| {
                self.unavailable(if e.is_timeout() {
                    format!("{what}: timed out")
                } else {
                    format!("{what}: answer cut off")
                })
            })?;
            if body.len() > MAX_BODY {
                return Err(self.unavailable(format!("{what}: answer too large")));
            }
            return Ok((status, body.to_vec()));
        }
        Err(match status {
            401 | 403 => MintError::Refused {
                target: self.target.clone(),
                reason: format!("{what}: HTTP {status}"),
            },
            429 => {
                let retry = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok());
                self.unavailable(match retry {
                    Some(s) => format!("{what}: rate limited (HTTP 429), retry after {s}s"),
                    None => format!("{what}: rate limited (HTTP 429)"),
                })
            }
            s if s >= 500 => self.unavailable(format!("{what}: HTTP {s}")),
            s => self.unavailable(format!("{what}: rejected (HTTP {s})")),
        })
    }

    /// [`Http::send`], then parses the body as JSON. A 2xx answer that does not parse
    /// is an upstream failure.
    pub(crate) async fn json<T: DeserializeOwned>(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<T, MintError> {
        let (_, body) = self.send(what, req, &[]).await?;
        self.parse(what, &body)
    }

    /// Parses an answer body; the error never shows it.
    pub(crate) fn parse<T: DeserializeOwned>(
        &self,
        what: &str,
        body: &[u8],
    ) -> Result<T, MintError> {
        serde_json::from_slice(body)
            .map_err(|_| self.unavailable(format!("{what}: unexpected answer")))
    }

    /// An upstream failure for this target.
    pub(crate) fn fail(&self, reason: impl Into<String>) -> MintError {
        self.unavailable(reason.into())
    }
}
