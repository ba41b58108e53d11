//! Background duties of a mounted client: the session heartbeat, cleaning up sessions of
//! clients that died, deleting objects no file references any more, dropping request
//! records that can no longer be needed (exactly-once, `vfs::requests`), and returning an
//! idle write journal's free memory to the kernel.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Vfs;
use crate::meta::Timestamp;

/// The background thread; stopped by [`Worker::stop`] or when dropped.
#[derive(Debug)]
pub struct Worker {
    stop: mpsc::Sender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub fn start(vfs: &Arc<Vfs>) -> std::io::Result<Worker> {
        let (stop, stopped) = mpsc::channel();
        let weak = Arc::downgrade(vfs);
        let thread = std::thread::Builder::new()
            .name("baton-background".into())
            .spawn(move || run(weak, stopped))?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            // The last reference to the Vfs may be dropped by the worker itself; it
            // cannot join itself, and it exits on its own after the stop message.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(vfs: Weak<Vfs>, stopped: mpsc::Receiver<()>) {
    let Some(cfg) = vfs.upgrade().map(|v| v.config().clone()) else {
        return;
    };
    let tick = cfg
        .heartbeat
        .min(cfg.gc_grace)
        .max(Duration::from_millis(100));
    let mut next_clean = Instant::now();
    let mut next_gc = Instant::now() + cfg.gc_grace;
    loop {
        match stopped.recv_timeout(tick) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let Some(vfs) = vfs.upgrade() else { return };
        let meta = vfs.meta();
        if let Err(e) = meta.heartbeat(vfs.session(), Timestamp::now()) {
            // Another client judged this session dead and cleaned it up: its locks and
            // kept files are gone. Keep serving; report loudly.
            tracing::error!(error = %e, session = %vfs.session(), "session heartbeat failed");
        }
        let now = Instant::now();
        vfs.forget_requests(now);
        vfs.data().trim_journal_if_idle(now);
        if now >= next_clean {
            next_clean = now + cfg.session_timeout / 4;
            let deadline = Timestamp(Timestamp::now().0 - cfg.session_timeout.as_nanos() as i64);
            match meta.clean_stale_sessions(deadline) {
                Ok(cleaned) if !cleaned.is_empty() => {
                    tracing::info!(?cleaned, "cleaned up sessions of dead clients");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cleaning stale sessions failed"),
            }
        }
        if now >= next_gc {
            next_gc = now + cfg.gc_grace / 2;
            match vfs.data().collect_garbage(cfg.gc_grace) {
                Ok(0) => {}
                Ok(n) => tracing::debug!(deleted = n, "deleted unreferenced slices"),
                Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
            }
        }
    }
}
