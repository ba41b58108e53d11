//! Object storage named by a URL, over opendal: where the immutable block objects live.
//!
//! Two schemes are compiled in, to keep the build lean: `fs:///abs/path` (a local
//! directory, opendal services-fs) and `s3://bucket[/prefix]?endpoint=..&region=..`
//! (opendal services-s3; credentials from the query's `access_key_id`,
//! `secret_access_key` and `session_token`, or else the standard AWS chain: the
//! `AWS_*` environment variables, profiles, instance metadata). [`ObjectStore::check`]
//! writes, reads back and deletes a probe so that a wrong bucket, endpoint or credential
//! fails at mount time, not at the first write.
//!
//! What it must never do: log a credential or put one in an error message. Every URL this
//! module shows is [`redact`]ed first.

use std::time::Duration;

use bytes::Bytes;
use opendal::Operator;
use opendal::layers::{RetryLayer, TimeoutLayer};

/// Query parameters that carry secrets and are never shown.
const SECRET_PARAMS: &[&str] = &["access_key_id", "secret_access_key", "session_token"];

/// Why a storage URL could not be turned into an object store.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("bad storage URL {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "unsupported storage scheme {scheme:?} in {url}: this build supports fs:///abs/path and \
         s3://bucket[/prefix]?endpoint=..&region=.. (only opendal's services-fs and services-s3 \
         are compiled in)"
    )]
    UnsupportedScheme { scheme: String, url: String },
    #[error("cannot configure object storage {url}")]
    Configure {
        url: String,
        #[source]
        source: opendal::Error,
    },
}

/// The step of the startup probe that failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("writing probe object {key} failed")]
    Write {
        key: String,
        #[source]
        source: opendal::Error,
    },
    #[error("reading probe object {key} back failed")]
    Read {
        key: String,
        #[source]
        source: opendal::Error,
    },
    #[error("probe object {key} read back different bytes than were written")]
    Mismatch { key: String },
    #[error("deleting probe object {key} failed")]
    Delete {
        key: String,
        #[source]
        source: opendal::Error,
    },
}

/// An object store: put, get and delete whole objects by key.
#[derive(Clone, Debug)]
pub struct ObjectStore {
    op: Operator,
    /// The URL with credentials removed: the only form that is shown.
    url: String,
}

impl ObjectStore {
    /// Builds the store named by `url`. Does no I/O: see [`ObjectStore::check`].
    pub fn open(url: &str) -> Result<Self, StoreOpenError> {
        let shown = redact(url);
        let parsed = url::Url::parse(url).map_err(|e| StoreOpenError::BadUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(StoreOpenError::BadUrl {
                url: shown,
                reason: "credentials go in the query (access_key_id, secret_access_key) or the \
                         AWS environment, not in the URL's user part"
                    .into(),
            });
        }
        let configure = |source| StoreOpenError::Configure {
            url: shown.clone(),
            source,
        };
        let op = match parsed.scheme() {
            "fs" => {
                let root = parsed.path();
                if parsed.host_str().is_some_and(|h| !h.is_empty())
                    || !root.starts_with('/')
                    || root == "/"
                {
                    return Err(StoreOpenError::BadUrl {
                        url: shown,
                        reason: "expected fs:///absolute/path (three slashes, not the root)".into(),
                    });
                }
                let root = root.trim_end_matches('/');
                // Objects are written to a temporary file and renamed, so a crash never
                // leaves a partial block under its final (immutable) name.
                let builder = opendal::services::Fs::default()
                    .root(root)
                    .atomic_write_dir(&format!("{root}/.tmp"));
                Operator::new(builder).map_err(configure)?.layer(retry())
            }
            "s3" => {
                opendal::install_default();
                let builder = s3_builder(&parsed, &shown)?;
                // Timeout inside retry: an attempt that hangs is cut and retried.
                Operator::new(builder)
                    .map_err(configure)?
                    .layer(
                        TimeoutLayer::new()
                            .with_timeout(Duration::from_secs(30))
                            .with_io_timeout(Duration::from_secs(30)),
                    )
                    .layer(retry())
            }
            other => {
                return Err(StoreOpenError::UnsupportedScheme {
                    scheme: other.to_string(),
                    url: shown,
                });
            }
        };
        Ok(ObjectStore { op, url: shown })
    }

    /// The store's URL, without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn put(&self, key: &str, data: Bytes) -> opendal::Result<()> {
        self.op.write(key, data).await.map(|_| ())
    }

    pub async fn get(&self, key: &str) -> opendal::Result<Bytes> {
        Ok(self.op.read(key).await?.to_bytes())
    }

    /// Deletes an object; deleting a missing object succeeds.
    pub async fn delete(&self, key: &str) -> opendal::Result<()> {
        self.op.delete(key).await
    }

    /// Writes, reads back and deletes a small probe object.
    pub async fn check(&self) -> Result<(), CheckError> {
        let key = format!(".baton-probe/{:016x}", rand::random::<u64>());
        let body = Bytes::from(format!("baton storage probe {key}"));
        self.op
            .write(&key, body.clone())
            .await
            .map_err(|source| CheckError::Write {
                key: key.clone(),
                source,
            })?;
        let back = self
            .op
            .read(&key)
            .await
            .map_err(|source| CheckError::Read {
                key: key.clone(),
                source,
            })?;
        if back.to_bytes() != body {
            return Err(CheckError::Mismatch { key });
        }
        self.op
            .delete(&key)
            .await
            .map_err(|source| CheckError::Delete { key, source })
    }
}

fn retry() -> RetryLayer {
    RetryLayer::new()
        .with_max_times(4)
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
}

fn s3_builder(url: &url::Url, shown: &str) -> Result<opendal::services::S3, StoreOpenError> {
    let bad = |reason: String| StoreOpenError::BadUrl {
        url: shown.to_string(),
        reason,
    };
    let bucket = url
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| bad("no bucket: expected s3://bucket[/prefix]".into()))?;
    let mut b = opendal::services::S3::default().bucket(bucket);
    let prefix = url.path().trim_matches('/');
    if !prefix.is_empty() {
        b = b.root(&format!("/{prefix}/"));
    }
    let mut key_id = None;
    let mut secret = None;
    let mut region = None;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "endpoint" => b = b.endpoint(&v),
            "region" => region = Some(v.into_owned()),
            "access_key_id" => key_id = Some(v.into_owned()),
            "secret_access_key" => secret = Some(v.into_owned()),
            "session_token" => b = b.session_token(&v),
            "virtual_host_style" if v == "true" => b = b.enable_virtual_host_style(),
            "virtual_host_style" => {}
            other => {
                return Err(bad(format!(
                    "unknown query parameter {other:?} (known: endpoint, region, access_key_id, \
                     secret_access_key, session_token, virtual_host_style)"
                )));
            }
        }
    }
    match (key_id, secret) {
        (Some(k), Some(s)) => b = b.access_key_id(&k).secret_access_key(&s),
        (None, None) => {}
        _ => {
            return Err(bad(
                "access_key_id and secret_access_key must be given together".into(),
            ));
        }
    }
    // Without a region anywhere, S3-compatible stores (MinIO, Ceph...) accept us-east-1;
    // opendal would otherwise refuse to build.
    let region = region
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_string());
    Ok(b.region(&region))
}

/// `url` with every secret query value and any user part replaced by `***`. Works on
/// unparsable input too (it is used to report parse errors).
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let head = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}{path}"),
                None => head.to_string(),
            }
        }
        None => head.to_string(),
    };
    let Some(query) = query else { return head };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            if SECRET_PARAMS.contains(&name) {
                format!("{name}=***")
            } else {
                pair.to_string()
            }
        })
        .collect();
    format!("{head}?{}", pairs.join("&"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_every_secret() {
        let url = "s3://b/p?endpoint=http://h:1&access_key_id=AKIA&secret_access_key=SECRET&session_token=TOK&region=r";
        let shown = redact(url);
        assert!(
            !shown.contains("AKIA") && !shown.contains("SECRET") && !shown.contains("TOK"),
            "{shown}"
        );
        assert!(shown.contains("endpoint=http://h:1") && shown.contains("region=r"));
        let shown = redact("s3://user:pass@bucket/x");
        assert!(
            !shown.contains("pass") && !shown.contains("user"),
            "{shown}"
        );
        assert_eq!(redact("fs:///data/blocks"), "fs:///data/blocks");
    }

    #[test]
    fn errors_never_show_credentials() {
        let err = ObjectStore::open("s3://b?access_key_id=AKIA&secret_access_key=SECRET&bogus=1")
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(
            text.contains("bogus") && !text.contains("SECRET") && !text.contains("AKIA"),
            "{text}"
        );
        let err = ObjectStore::open("s3://b?secret_access_key=SECRET").unwrap_err();
        assert!(!format!("{err:?}").contains("SECRET"));
    }

    #[test]
    fn unsupported_schemes_name_the_supported_ones() {
        let err = ObjectStore::open("gcs://bucket").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("fs://") && text.contains("s3://"), "{text}");
        assert!(matches!(
            ObjectStore::open("fs://relative/x"),
            Err(StoreOpenError::BadUrl { .. })
        ));
        assert!(matches!(
            ObjectStore::open("fs:///"),
            Err(StoreOpenError::BadUrl { .. })
        ));
    }

    #[test]
    fn fs_store_roundtrip_and_check() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("fs://{}", dir.path().join("objects").display());
        let store = ObjectStore::open(&url).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            store.check().await.unwrap();
            store
                .put("chunks/0/0/1_0_3", Bytes::from_static(b"abc"))
                .await
                .unwrap();
            assert_eq!(
                store.get("chunks/0/0/1_0_3").await.unwrap(),
                Bytes::from_static(b"abc")
            );
            store.delete("chunks/0/0/1_0_3").await.unwrap();
            store.delete("chunks/0/0/1_0_3").await.unwrap();
            let gone = store.get("chunks/0/0/1_0_3").await.unwrap_err();
            assert_eq!(gone.kind(), opendal::ErrorKind::NotFound);
        });
    }
}
