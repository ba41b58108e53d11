#!/usr/bin/env bash
# Runs every Baton test. Installs what the tests need and is missing (redis-server, the
# moto S3 server, the FUSE device), then runs the workspace tests.
# Run as root on Debian/Ubuntu with a Rust toolchain: FUSE tests mount for real.
set -euo pipefail
cd "$(dirname "$0")/.."

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "scripts/test.sh: run as root (the FUSE tests mount filesystems)" >&2
        exit 1
    fi
}
need_root

if ! command -v redis-server >/dev/null; then
    echo "== installing redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # The tests start their own servers; the packaged service is not needed.
    (systemctl disable --now redis-server 2>/dev/null || service redis-server stop 2>/dev/null) || true
fi

if ! command -v moto_server >/dev/null; then
    echo "== installing moto (S3-compatible test server)"
    python3 -m pip install --quiet 'moto[server]'
    command -v pyenv >/dev/null && pyenv rehash || true
fi

if [ ! -c /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
    if [ ! -c /dev/fuse ]; then
        echo "scripts/test.sh: /dev/fuse is missing and the fuse module could not be loaded" >&2
        exit 1
    fi
fi

# etcd, kube-apiserver (built once, cached) and a Helm renderer for baton-csi's tests.
bash scripts/k8s-test-deps.sh

echo "== cargo test --workspace"
cargo test --workspace --locked "$@"

# Crash recovery and upgrades on a real kernel without FUSE_NOTIFY_RESEND: Debian 12's own
# 6.1 under QEMU. BATON_SKIP_KERNEL_MATRIX=1 skips it (and says so).
if [ "${BATON_SKIP_KERNEL_MATRIX:-}" = 1 ]; then
    echo "== SKIPPED: scripts/kernel-matrix.sh (BATON_SKIP_KERNEL_MATRIX=1)"
else
    echo "== scripts/kernel-matrix.sh --kernels 6.1"
    bash scripts/kernel-matrix.sh --kernels 6.1
fi
