//! `helm template`: with `helm` if installed, else Helm's own engine (helm-python-sdk).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

/// Renders a Helm chart (`helm template`) with `values`; returns every object, in the
/// order Helm prints them.
pub fn render_chart(
    chart: &Path,
    release: &str,
    namespace: &str,
    values: &Value,
) -> anyhow::Result<Vec<Value>> {
    let values_file = tempfile::Builder::new().suffix(".json").tempfile()?;
    std::fs::write(values_file.path(), serde_json::to_vec(values)?)?;
    let manifests: Vec<String> = if Command::new("helm")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = Command::new("helm")
            .arg("template")
            .arg(release)
            .arg(chart)
            .args(["--namespace", namespace, "--values"])
            .arg(values_file.path())
            .output()?;
        if !out.status.success() {
            bail!(
                "helm template failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        vec![String::from_utf8(out.stdout)?]
    } else {
        const SCRIPT: &str = r#"
import json, sys
from helm_python import Chart
chart = Chart.load(sys.argv[1])
with open(sys.argv[4]) as f:
    values = json.load(f)
out = chart.render(values, name=sys.argv[2], namespace=sys.argv[3], is_install=True)
json.dump(sorted(out.items()), sys.stdout)
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .arg(chart)
            .arg(release)
            .arg(namespace)
            .arg(values_file.path())
            .output()
            .context("running python3")?;
        if !out.status.success() {
            bail!(
                "rendering the chart with helm-python-sdk failed (run scripts/k8s-test-deps.sh): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let files: Vec<(String, String)> = serde_json::from_slice(&out.stdout)?;
        files
            .into_iter()
            .filter(|(p, _)| p.ends_with(".yaml") || p.ends_with(".yml"))
            .map(|(_, m)| m)
            .collect()
    };
    let mut objects = Vec::new();
    for text in manifests {
        objects.extend(parse_manifests(&text)?);
    }
    Ok(objects)
}

/// The objects of a multi-document YAML text (empty documents skipped).
pub fn parse_manifests(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v: Value =
            serde::Deserialize::deserialize(doc).context("a manifest is not valid YAML")?;
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}
