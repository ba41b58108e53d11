#!/usr/bin/env bash
# Installs what the Kubernetes tests of baton-csi need, when it is missing:
#   - etcd (Debian's etcd-server; the packaged service is disabled: tests start their own),
#   - kube-apiserver v1.20.2, built from Debian's `kubernetes` source package with Debian's
#     Go 1.19 (no other download: vendor/ is in the source package) and cached in
#     $BATON_K8S_CACHE (default /var/cache/baton-test) so only the first run pays (~5 min),
#   - a Helm renderer for the chart test: `helm` if it is on PATH, else the
#     helm-python-sdk wheel from PyPI (Helm's own Go engine as a shared library).
# Prints the paths it settled on. Run as root on Debian/Ubuntu. Idempotent.
set -euo pipefail

CACHE="${BATON_K8S_CACHE:-/var/cache/baton-test}"
KUBE_VERSION=1.20.2
APISERVER="$CACHE/kube-apiserver-$KUBE_VERSION"

apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- etcd ---------------------------------------------------------------------------
if ! command -v etcd >/dev/null && [ ! -x /usr/bin/etcd ]; then
    echo "== installing etcd-server"
    apt_install etcd-server
    (systemctl disable --now etcd 2>/dev/null || service etcd stop 2>/dev/null) || true
fi

# openssl makes the test API server's service account key.
if ! command -v openssl >/dev/null; then
    echo "== installing openssl"
    apt_install openssl
fi

# --- kube-apiserver -----------------------------------------------------------------
if [ -n "${KUBE_APISERVER:-}" ] && [ -x "$KUBE_APISERVER" ]; then
    APISERVER="$KUBE_APISERVER"
elif [ ! -x "$APISERVER" ]; then
    echo "== building kube-apiserver $KUBE_VERSION from Debian's kubernetes source package (once; cached in $CACHE)"
    started=$(date +%s)
    mkdir -p "$CACHE"
    work=$(mktemp -d /tmp/baton-kube-build.XXXXXX)
    chmod 755 "$work" # apt-get source downloads as the _apt user
    src_list=/etc/apt/sources.list.d/baton-k8s-deb-src.list
    cleanup() {
        rm -rf "$work"
        rm -f "$src_list"
    }
    trap cleanup EXIT
    echo "deb-src http://deb.debian.org/debian bookworm main" >"$src_list"
    APT_UPDATED=
    apt_install golang-1.19-go dpkg-dev rsync
    (cd "$work" && apt-get source --download-only -qq kubernetes >/dev/null)
    (cd "$work" && dpkg-source --no-check -x kubernetes_*.dsc src >/dev/null)
    # GOPATH mode: the Kubernetes 1.20 build scripts lay out their own GOPATH under
    # _output/ and build from vendor/.
    (
        cd "$work/src"
        export PATH="/usr/lib/go-1.19/bin:$PATH"
        export GO111MODULE=off GOFLAGS= GOCACHE="$work/gocache" GOTOOLCHAIN=local
        export KUBE_GIT_VERSION="v$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean
        make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 || {
            tail -40 "$work/build.log" >&2
            exit 1
        }
    )
    built=$(find "$work/src/_output" -type f -name kube-apiserver -perm -u+x | head -1)
    [ -n "$built" ] || { echo "k8s-test-deps: kube-apiserver was not built" >&2; exit 1; }
    install -m 0755 "$built" "$APISERVER.tmp"
    mv "$APISERVER.tmp" "$APISERVER"
    echo "== kube-apiserver built in $(( $(date +%s) - started ))s"
fi

# --- Helm renderer ------------------------------------------------------------------
if ! command -v helm >/dev/null && ! python3 -c 'import helm_python' 2>/dev/null; then
    echo "== installing helm-python-sdk (Helm's template engine, for the chart test)"
    python3 -m pip install --quiet 'helm-python-sdk==0.2.2'
fi

echo "k8s-test-deps: etcd=$(command -v etcd || echo /usr/bin/etcd) kube-apiserver=$APISERVER"
