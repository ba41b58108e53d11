//! Counts the requests baton-csi makes to the API server, by verb (`kube` tags each request
//! with its verb: `get`, `list_metadata`, `watch_metadata`, `create`, `patch`, ...), so
//! the load an upgrade puts on the API server is measured, not guessed. With
//! `--api-request-counts FILE` the counts are written to FILE (JSON) after each request.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Request counts by verb, shared by every clone of the client.
#[derive(Clone, Debug, Default)]
pub struct ApiCounts {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    file: Option<PathBuf>,
}

/// Whether `verb` (as counted) changes something in the API server.
pub fn is_write(verb: &str) -> bool {
    ["create", "patch", "replace", "delete", "evict"]
        .iter()
        .any(|w| verb.starts_with(w))
}

impl ApiCounts {
    pub fn new(file: Option<PathBuf>) -> ApiCounts {
        ApiCounts {
            counts: Arc::default(),
            file,
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, verb: &str) {
        let snapshot = {
            let mut c = self
                .counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *c.entry(verb.to_string()).or_default() += 1;
            c.clone()
        };
        if let Some(path) = &self.file {
            // A diagnostic: a failed write is logged, never fatal.
            let tmp = path.with_extension("tmp");
            let bytes = serde_json::to_vec(&snapshot).unwrap_or_default();
            if let Err(e) = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)) {
                tracing::warn!(error = %e, "cannot write the API request counts");
            }
        }
    }
}

/// The tower layer that counts.
#[derive(Clone, Debug)]
pub struct CountingLayer(pub ApiCounts);

impl<S> tower::Layer<S> for CountingLayer {
    type Service = Counting<S>;
    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            counts: self.0.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Counting<S> {
    inner: S,
    counts: ApiCounts,
}

impl<S, B> tower::Service<http::Request<B>> for Counting<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verb = req
            .extensions()
            .get::<&'static str>()
            .copied()
            .unwrap_or("other");
        self.counts.record(verb);
        self.inner.call(req)
    }
}

/// A client from the in-cluster service account or `$KUBECONFIG`, counting its requests.
pub async fn counting_client(counts: &ApiCounts) -> Result<kube::Client, kube::Error> {
    let config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&CountingLayer(counts.clone()))
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{Layer, Service, ServiceExt};

    #[tokio::test]
    async fn counts_requests_by_verb_and_writes_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("counts.json");
        let counts = ApiCounts::new(Some(file.clone()));
        let mut svc =
            CountingLayer(counts.clone()).layer(tower::service_fn(|_: http::Request<()>| async {
                Ok::<_, std::convert::Infallible>(())
            }));
        for verb in ["patch", "create", "patch", "watch_metadata"] {
            let mut req = http::Request::new(());
            req.extensions_mut().insert(verb);
            svc.ready()
                .await
                .expect("ready")
                .call(req)
                .await
                .expect("call");
        }
        svc.ready()
            .await
            .expect("ready")
            .call(http::Request::new(()))
            .await
            .expect("call");
        let want = BTreeMap::from([
            ("create".to_string(), 1),
            ("other".to_string(), 1),
            ("patch".to_string(), 2),
            ("watch_metadata".to_string(), 1),
        ]);
        assert_eq!(counts.snapshot(), want);
        let written: BTreeMap<String, u64> =
            serde_json::from_slice(&std::fs::read(&file).expect("file")).expect("json");
        assert_eq!(written, want);
        assert!(is_write("patch_metadata") && is_write("create") && !is_write("watch"));
    }
}
