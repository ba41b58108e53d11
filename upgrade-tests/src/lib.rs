//! Baton's live-upgrade test kit: the verifying application workload
//! ([`workload`]), helpers that drive `baton upgrade` and `baton status --json` the way an
//! operator does ([`baton_cli`]), the fault injector of the alternative client build
//! ([`inject`]), chaos on a live mount — kills and upgrades at random moments under an
//! application, judged from what it saw — behind `baton-chaos` ([`chaos`]), the
//! end-to-end tests (`tests/`) and the pause benchmarks (`benches/`).
//!
//! It judges Baton only from the outside — through the mount, the CLI and exit statuses —
//! and must never reach into a client's or the supervisor's internals to make a test pass.

pub mod baton_cli;
pub mod chaos;
pub mod inject;
pub mod workload;
