//! A redb volume in a temporary directory and a runtime for the `Vfs` instances that open
//! it, shared by the tests that play a client and its successor on one volume.
#![allow(dead_code, clippy::unwrap_used)]

use fsclient::meta::{self, Caller, Format, SessionId, Timestamp};
use fsclient::vfs::VfsConfig;

pub const ME: Caller = Caller {
    uid: 0,
    gid: 0,
    pid: 1,
};

pub struct Volume {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
}

impl Volume {
    /// A new formatted volume whose uuid is `uuid`.
    pub fn new(uuid: &str) -> Volume {
        let dir = tempfile::tempdir().unwrap();
        let m = meta::open(&url_of(&dir)).unwrap();
        let format = Format {
            name: "vol".into(),
            uuid: uuid.into(),
            storage: format!("fs://{}", dir.path().join("objects").display()),
            block_size: Format::MIN_BLOCK_SIZE,
            capacity: 0,
            inodes: 0,
            created: Timestamp::now(),
        };
        m.format(&format, false).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Volume { dir, rt }
    }

    pub fn url(&self) -> String {
        url_of(&self.dir)
    }

    /// A client's configuration: a new session, or `resume`'s.
    pub fn config(&self, resume: Option<SessionId>) -> VfsConfig {
        let mut c = VfsConfig::new(self.url(), "/mnt/test", self.dir.path().join("home"));
        c.cache_dir = Some(self.dir.path().join("cache"));
        c.resume_session = resume;
        c
    }
}

fn url_of(dir: &tempfile::TempDir) -> String {
    format!("redb://{}/meta.redb", dir.path().display())
}
