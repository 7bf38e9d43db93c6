//! Latchkey: a short-lived credential broker.
//!
//! A CI job or workload presents the OIDC token its platform issued; Latchkey verifies
//! it, decides by policy, mints a scoped, time-bound credential for one target system,
//! and writes the decision to a tamper-evident audit log before answering.
//!
//! Map of the crate (one request flows top to bottom):
//!
//! | module | role |
//! |---|---|
//! | [`transport`] | gRPC and HTTP handlers; proto ↔ domain; errors → status codes |
//! | [`broker`] | the use case: verify → decide → mint → audit → answer |
//! | [`identity`] | token parsing, JWKS cache, issuer presets → [`identity::WorkloadIdentity`] |
//! | [`policy`] | rules, matchers, pure `decide`/`explain` |
//! | [`mint`] | the [`mint::Minter`] trait and one minter per target kind |
//! | [`lease`] | lease records, renewal arithmetic |
//! | [`keys`] | the broker's signing keys, sealed under the master key; JWKS |
//! | [`audit`] | record type and hash chain |
//! | [`store`] | persistence behind one trait; SQLite by default |
//! | [`config`] | TOML → checked [`config::Config`] |
//! | [`metrics`] | Prometheus metrics of one broker |
//! | [`ratelimit`] | per-identity and per-source-IP rate limits |
//! | [`rotation`] | rotation schedule math and report types (the runner is in [`broker`]) |
//! | [`server`] | starting/stopping listeners |
//! | [`cli`] | the `latchkey` command |
//! | [`devissuer`] | the development issuer used by `latchkey dev` and the tests |
//! | [`jose`], [`secret`], [`clock`], [`net`] | JOSE helpers, redacted secrets, injectable time, loopback checks |

#![warn(missing_docs)]

pub mod audit;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod devissuer;
pub mod identity;
pub mod jose;
pub mod keys;
#[cfg(test)]
mod layering;
pub mod lease;
pub mod metrics;
pub mod mint;
pub mod net;
pub mod pgtls;
pub mod policy;
pub mod ratelimit;
pub mod rotation;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transport;
