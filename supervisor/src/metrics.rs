//! `baton mount --metrics ADDR`: the mount's status as Prometheus text over plain HTTP.
//!
//! A tiny HTTP/1.x server on its own thread (a slow scraper never delays the supervisor's
//! event loop): `GET /metrics` (or `/`) answers the last snapshot the supervisor
//! published; anything else is 404. Metric names (all with the labels `mountpoint` and
//! `volume`):
//!
//! | name | type | meaning |
//! |---|---|---|
//! | `baton_client_generation` | gauge | generation of the client that serves |
//! | `baton_client_info` | gauge | 1, with labels `version` and `pid` of that client |
//! | `baton_uptime_seconds` | gauge | since the mount was made |
//! | `baton_upgrades_total` | counter | successful live upgrades |
//! | `baton_upgrade_rollbacks_total` | counter | upgrades that rolled back |
//! | `baton_client_restarts_total` | counter | clients started to replace one that died |
//! | `baton_last_upgrade_pause_seconds` | gauge | pause of the last upgrade (absent before the first) |
//! | `baton_last_crash_pause_seconds` | gauge | pause of the last crash: the client's death to the first request its successor served (absent before the first) |
//! | `baton_restart_attempts` | gauge | attempts of the client restart in progress (0: none runs) |
//! | `baton_fuse_resend_available` | gauge | 1 if the kernel offered FUSE_NOTIFY_RESEND |
//! | `baton_upgrade_in_progress` | gauge | 1 while an upgrade, rollback or restart runs |
//! | `baton_state` | gauge | 1, with label `state`: serving, upgrading, rolling back, restarting |

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use handover_proto::control::{ClientHealth, MountStatus};

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head read.
const MAX_REQUEST: usize = 8 << 10;

/// What the supervisor publishes.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub status: MountStatus,
    /// What the supervisor is doing ([`crate::upgrade::PhaseKind::as_str`]).
    pub state: &'static str,
    pub health: ClientHealth,
}

/// The metrics endpoint could not be started.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for metrics")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// A running metrics endpoint; the supervisor publishes into it.
#[derive(Debug)]
pub struct MetricsServer {
    shared: Arc<Mutex<Option<Snapshot>>>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listens on `addr` and serves from a thread.
    pub fn start(addr: SocketAddr, started: Instant) -> Result<MetricsServer, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        let shared: Arc<Mutex<Option<Snapshot>>> = Arc::new(Mutex::new(None));
        let theirs = shared.clone();
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let _entered = span.enter();
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => serve(c, &theirs, started),
                        Err(e) => tracing::debug!(error = %e, "metrics accept failed"),
                    }
                }
            })
            .map_err(MetricsError::Thread)?;
        tracing::info!(%addr, "serving metrics");
        Ok(MetricsServer { shared, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces what the endpoint serves.
    pub fn publish(&self, snapshot: Snapshot) {
        if let Ok(mut s) = self.shared.lock() {
            *s = Some(snapshot);
        }
    }
}

fn serve(mut conn: TcpStream, shared: &Mutex<Option<Snapshot>>, started: Instant) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_write_timeout(Some(REQUEST_TIMEOUT));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let snapshot = shared.lock().ok().and_then(|s| s.clone());
    let (status, body) = match (method, path, snapshot) {
        ("GET", "/metrics" | "/", Some(mut s)) => {
            s.status.uptime_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            ("200 OK", render(&s))
        }
        ("GET", "/metrics" | "/", None) => ("503 Service Unavailable", "starting\n".into()),
        _ => ("404 Not Found", "not found: try /metrics\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(response.as_bytes());
}

/// A label value escaped as the text format wants.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of one mount.
pub fn render(s: &Snapshot) -> String {
    let st = &s.status;
    let labels = format!(
        "mountpoint=\"{}\",volume=\"{}\"",
        escape(&st.mountpoint.display().to_string()),
        escape(&st.volume)
    );
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, extra: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        let _ = writeln!(out, "{name}{{{labels}{extra}}} {value}");
    };
    metric(
        "baton_client_generation",
        "gauge",
        "Generation of the client process that serves the mount.",
        "",
        st.generation.0.to_string(),
    );
    metric(
        "baton_client_info",
        "gauge",
        "The client that serves the mount (always 1).",
        &format!(
            ",version=\"{}\",pid=\"{}\"",
            escape(&st.client_version),
            st.client_pid
        ),
        "1".into(),
    );
    metric(
        "baton_uptime_seconds",
        "gauge",
        "Seconds since the mount was made.",
        "",
        format!("{:.3}", st.uptime_ms as f64 / 1000.0),
    );
    metric(
        "baton_upgrades_total",
        "counter",
        "Successful live upgrades of the client.",
        "",
        st.upgrades.to_string(),
    );
    metric(
        "baton_upgrade_rollbacks_total",
        "counter",
        "Upgrades that rolled back.",
        "",
        st.rollbacks.to_string(),
    );
    metric(
        "baton_client_restarts_total",
        "counter",
        "Client processes started to replace one that died.",
        "",
        st.restarts.to_string(),
    );
    if let Some(p) = st.last_pause_us {
        metric(
            "baton_last_upgrade_pause_seconds",
            "gauge",
            "Pause of the last upgrade: freeze to the first request served by the successor.",
            "",
            format!("{:.6}", p as f64 / 1e6),
        );
    }
    if let Some(p) = s.health.last_crash_pause_us {
        metric(
            "baton_last_crash_pause_seconds",
            "gauge",
            "Pause of the last crash: the client's death to the first request its successor served.",
            "",
            format!("{:.6}", p as f64 / 1e6),
        );
    }
    metric(
        "baton_restart_attempts",
        "gauge",
        "Attempts of the client restart in progress (0: none runs).",
        "",
        s.health.restart_attempts.to_string(),
    );
    metric(
        "baton_fuse_resend_available",
        "gauge",
        "1 if the kernel offered FUSE_NOTIFY_RESEND (upgrades park and resend), 0 if they drain.",
        "",
        u8::from(st.resend).to_string(),
    );
    metric(
        "baton_upgrade_in_progress",
        "gauge",
        "1 while an upgrade, its rollback or a client restart runs.",
        "",
        u8::from(s.state != "serving").to_string(),
    );
    metric(
        "baton_state",
        "gauge",
        "What the supervisor is doing (always 1).",
        &format!(",state=\"{}\"", s.state),
        "1".into(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use handover_proto::message::Generation;

    fn snapshot() -> Snapshot {
        Snapshot {
            status: MountStatus {
                mountpoint: "/mnt/a \"b\"".into(),
                volume: "vol".into(),
                meta_url: "redb:///x".into(),
                supervisor_pid: 10,
                generation: Generation(3),
                client_pid: 42,
                client_version: "0.1.0".into(),
                uptime_ms: 1500,
                fuse_minor: 45,
                max_write: 1 << 20,
                resend: true,
                upgrades: 2,
                rollbacks: 1,
                restarts: 0,
                last_pause_us: Some(1234),
                last_rollback: None,
            },
            state: "serving",
            health: ClientHealth {
                state: "serving".into(),
                reason: None,
                restart_attempts: 0,
                next_attempt_ms: None,
                last_crash: Some("killed by SIGKILL".into()),
                last_crash_pause_us: Some(40_000),
            },
        }
    }

    #[test]
    fn renders_every_metric_with_escaped_labels() {
        let text = render(&snapshot());
        let l = r#"mountpoint="/mnt/a \"b\"",volume="vol""#;
        for line in [
            format!("baton_client_generation{{{l}}} 3"),
            format!("baton_client_info{{{l},version=\"0.1.0\",pid=\"42\"}} 1"),
            format!("baton_upgrades_total{{{l}}} 2"),
            format!("baton_upgrade_rollbacks_total{{{l}}} 1"),
            format!("baton_client_restarts_total{{{l}}} 0"),
            format!("baton_last_upgrade_pause_seconds{{{l}}} 0.001234"),
            format!("baton_last_crash_pause_seconds{{{l}}} 0.040000"),
            format!("baton_restart_attempts{{{l}}} 0"),
            format!("baton_fuse_resend_available{{{l}}} 1"),
            format!("baton_upgrade_in_progress{{{l}}} 0"),
            format!("baton_state{{{l},state=\"serving\"}} 1"),
            "# TYPE baton_upgrades_total counter".to_string(),
        ] {
            assert!(text.lines().any(|x| x == line), "missing {line}:\n{text}");
        }
    }

    #[test]
    fn serves_over_http() {
        let m = MetricsServer::start("127.0.0.1:0".parse().expect("addr"), Instant::now())
            .expect("start");
        let get = |path: &str| {
            let mut c = TcpStream::connect(m.addr()).expect("connect");
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
            let mut s = String::new();
            c.read_to_string(&mut s).expect("read");
            s
        };
        assert!(get("/metrics").starts_with("HTTP/1.1 503"));
        m.publish(snapshot());
        let r = get("/metrics");
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("baton_client_generation{"), "{r}");
        assert!(get("/nope").starts_with("HTTP/1.1 404"));
    }
}
