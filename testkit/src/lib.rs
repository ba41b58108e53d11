//! Test harness shared by Baton's test suites: services started on free loopback ports
//! for one test run and stopped (killed and reaped) when dropped, even when a test fails.
//! Never assumes a service is already running.

#[cfg(feature = "kube")]
pub mod kube;
pub mod mount;
pub mod redis;
pub mod s3;
