//! The upgrade annotations: what a user writes (`baton.dev/upgrade`) and what baton-csi
//! answers (`baton.dev/upgrade-status`). Pure: no API server, no clock.
//!
//! Grammar (docs/kubernetes.md, *Upgrades*):
//!
//! ```text
//! request  = "binary:" version | "pod:" image
//! version  = 1*64 ( ALPHA / DIGIT / "." / "_" / "+" / "-" ), starting with ALPHA / DIGIT
//! image    = 1*255 printable ASCII without whitespace, no "..", starting with a lower-case
//!            letter or digit, ending with a letter or digit; an optional ":tag" and/or
//!            "@sha256:<64 hex>"
//! ```
//!
//! Surrounding whitespace is ignored; anything else is refused with a reason meant for an
//! Event, never silently reinterpreted.

use serde::{Deserialize, Serialize};

/// The annotation that asks for an upgrade (on a mount pod, a PersistentVolume or a Node).
pub const UPGRADE_ANNOTATION: &str = "baton.dev/upgrade";
/// The annotation baton-csi writes on a mount pod with the state of its upgrade.
pub const STATUS_ANNOTATION: &str = "baton.dev/upgrade-status";

/// The longest request value accepted (`pod:` + a 255-byte image reference).
pub const MAX_REQUEST_LEN: usize = 260;

/// A client version: the name of a directory of client binaries (`<bin>/<version>/`), so
/// it can never name a path outside that directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version(String);

impl Version {
    pub fn parse(s: &str) -> Result<Version, RequestError> {
        let ok_first = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
        let ok_chars = s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
        if s.is_empty() || s.len() > 64 || !ok_first || !ok_chars {
            return Err(RequestError::BadVersion(clip(s)));
        }
        Ok(Version(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Version {
    type Error = RequestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Version::parse(&s)
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What an upgrade annotation asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpgradeRequest {
    /// Replace the client binary of the mount (the supervisor stays).
    Binary(Version),
    /// Replace the mount pod with one of this image (not supported yet).
    Pod(String),
}

impl std::fmt::Display for UpgradeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeRequest::Binary(v) => write!(f, "binary:{v}"),
            UpgradeRequest::Pod(i) => write!(f, "pod:{i}"),
        }
    }
}

/// Why an upgrade annotation was refused. The message is the Event's and the status's
/// reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty upgrade request (expected binary:<version> or pod:<image>)")]
    Empty,
    #[error("the upgrade request is {0} bytes long (at most {MAX_REQUEST_LEN})")]
    TooLong(usize),
    #[error("unknown upgrade kind {0:?} (expected binary:<version> or pod:<image>)")]
    UnknownKind(String),
    #[error(
        "invalid version {0:?}: 1 to 64 letters, digits, '.', '_', '+', '-', starting with a letter or digit"
    )]
    BadVersion(String),
    #[error("invalid image reference {0:?}")]
    BadImage(String),
}

/// At most 80 characters of `s`, for an error message.
fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

fn valid_image(s: &str) -> bool {
    let (name_tag, digest) = match s.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    if let Some(d) = digest {
        let Some(hex) = d.strip_prefix("sha256:") else {
            return false;
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return false;
        }
    }
    let first = name_tag.bytes().next();
    let last = name_tag.bytes().last();
    s.len() <= 255
        && first.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && last.is_some_and(|b| b.is_ascii_alphanumeric())
        && !name_tag.contains("..")
        && !name_tag.contains("//")
        && name_tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':'))
}

impl UpgradeRequest {
    /// Parses the value of [`UPGRADE_ANNOTATION`].
    pub fn parse(value: &str) -> Result<UpgradeRequest, RequestError> {
        let value = value.trim();
        if value.is_empty() {
            return Err(RequestError::Empty);
        }
        if value.len() > MAX_REQUEST_LEN {
            // Never echo a huge value into statuses and Events.
            return Err(RequestError::TooLong(value.len()));
        }
        let Some((kind, arg)) = value.split_once(':') else {
            return Err(RequestError::UnknownKind(clip(value)));
        };
        match kind {
            "binary" => Version::parse(arg).map(UpgradeRequest::Binary),
            "pod" if valid_image(arg) => Ok(UpgradeRequest::Pod(arg.to_string())),
            "pod" => Err(RequestError::BadImage(clip(arg))),
            other => Err(RequestError::UnknownKind(clip(other))),
        }
    }
}

/// Where an upgrade is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    RolledBack,
}

impl Phase {
    /// Whether the request is done with (nothing more happens until it changes).
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::RolledBack)
    }
}

/// The value of [`STATUS_ANNOTATION`] (JSON), also kept in the state directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStatus {
    pub phase: Phase,
    /// The annotation value this status answers, verbatim (so a changed request is seen).
    pub request: String,
    /// Which object carried it: `pod/<ns>/<name>`, `pv/<name>` or `node/<name>`.
    pub source: String,
    /// The client generation serving after the upgrade (or still serving, if it failed).
    pub generation: Option<u64>,
    /// How long applications were paused, in milliseconds (rounded up).
    pub pause_ms: Option<u64>,
    pub reason: Option<String>,
}

impl UpgradeStatus {
    pub fn new(phase: Phase, request: &str, source: &str) -> UpgradeStatus {
        UpgradeStatus {
            phase,
            request: request.to_string(),
            source: source.to_string(),
            generation: None,
            pause_ms: None,
            reason: None,
        }
    }

    pub fn with_reason(mut self, reason: impl Into<String>) -> UpgradeStatus {
        self.reason = Some(reason.into());
        self
    }

    pub fn to_json(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses an annotation value; `None` if it is not ours or damaged.
    pub fn from_json(s: &str) -> Option<UpgradeStatus> {
        serde_json::from_str(s).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn binary_and_pod_requests_parse() {
        assert_eq!(
            UpgradeRequest::parse(" binary:0.2.0-rc.1+build5 "),
            Ok(UpgradeRequest::Binary(Version("0.2.0-rc.1+build5".into())))
        );
        assert_eq!(
            UpgradeRequest::parse("pod:ghcr.io/baton-fs/baton:0.2.0"),
            Ok(UpgradeRequest::Pod("ghcr.io/baton-fs/baton:0.2.0".into()))
        );
        let digest = format!("pod:registry:5000/baton@sha256:{}", "a".repeat(64));
        assert!(matches!(
            UpgradeRequest::parse(&digest),
            Ok(UpgradeRequest::Pod(_))
        ));
    }

    #[test]
    fn malformed_requests_are_refused_with_a_reason() {
        for (value, want) in [
            ("", RequestError::Empty),
            ("   ", RequestError::Empty),
            ("0.2.0", RequestError::UnknownKind("0.2.0".into())),
            ("binarie:0.2.0", RequestError::UnknownKind("binarie".into())),
            ("binary:", RequestError::BadVersion(String::new())),
            (
                "binary:../../bin/sh",
                RequestError::BadVersion("../../bin/sh".into()),
            ),
            ("binary:.hidden", RequestError::BadVersion(".hidden".into())),
            ("binary:1.0 2", RequestError::BadVersion("1.0 2".into())),
            ("binary:a/b", RequestError::BadVersion("a/b".into())),
            ("pod:", RequestError::BadImage(String::new())),
            (
                "pod:Upper/case",
                RequestError::BadImage("Upper/case".into()),
            ),
            ("pod:a b", RequestError::BadImage("a b".into())),
            (
                "pod:img@sha256:12",
                RequestError::BadImage("img@sha256:12".into()),
            ),
        ] {
            assert_eq!(UpgradeRequest::parse(value), Err(want), "{value:?}");
        }
        assert_eq!(
            UpgradeRequest::parse(&"x".repeat(10_000)),
            Err(RequestError::TooLong(10_000))
        );
        let long = format!("binary:{}", "1".repeat(65));
        assert!(matches!(
            UpgradeRequest::parse(&long),
            Err(RequestError::BadVersion(_))
        ));
    }

    #[test]
    fn status_json_has_the_documented_fields() {
        let mut s = UpgradeStatus::new(Phase::RolledBack, "binary:0.2.0", "pv/data");
        s.generation = Some(3);
        s.pause_ms = Some(12);
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).expect("json");
        assert_eq!(v["phase"], "rolled-back");
        assert_eq!(v["generation"], 3);
        assert_eq!(v["pause_ms"], 12);
        assert!(v["reason"].is_null());
        assert_eq!(UpgradeStatus::from_json(&s.to_json()), Some(s));
        assert_eq!(UpgradeStatus::from_json("{\"phase\":\"exploded\"}"), None);
    }

    proptest! {
        // Any string: a typed answer, never a panic; a version never leaves its directory.
        #[test]
        fn any_value_parses_or_is_refused(s in ".{0,300}") {
            match UpgradeRequest::parse(&s) {
                Ok(UpgradeRequest::Binary(v)) => {
                    prop_assert!(!v.as_str().contains('/') && !v.as_str().starts_with('.'));
                    prop_assert!(!v.as_str().is_empty() && v.as_str().len() <= 64);
                }
                Ok(UpgradeRequest::Pod(i)) => {
                    prop_assert!(!i.is_empty() && !i.contains(char::is_whitespace));
                }
                Err(e) => {
                    let m = e.to_string();
                    // At most 80 characters of the value, each at most 10 once escaped.
                    prop_assert!(!m.is_empty() && m.len() < 80 * 10 + 200, "{}", m);
                }
            }
        }

        // What we print parses back to the same request.
        #[test]
        fn valid_requests_round_trip(v in "[a-z0-9][a-z0-9._+-]{0,63}", img in "[a-z0-9]{1,10}(/[a-z0-9]{1,10}){0,2}(:[a-z0-9]{1,8})?") {
            let b = UpgradeRequest::Binary(Version::parse(&v).expect("valid"));
            prop_assert_eq!(UpgradeRequest::parse(&b.to_string()), Ok(b));
            let p = UpgradeRequest::parse(&format!("pod:{img}")).expect("valid image");
            prop_assert_eq!(UpgradeRequest::parse(&p.to_string()), Ok(p));
        }
    }
}
