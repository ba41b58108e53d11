#!/usr/bin/env bash
# Baton on the kernels fleets run, for real: boots Debian's own kernel packages under QEMU
# (software emulation, TCG) with a small initramfs that holds Baton's release binaries and
# their shared libraries, mounts an embedded volume inside the guest, and runs baton-chaos
# there: the verifying workload, kill -9 of the client at random moments and live upgrades.
# These kernels have no FUSE_NOTIFY_RESEND: what a killed client had read is answered from
# the request log.
#
# Usage: scripts/kernel-matrix.sh [--kernels 6.1,5.10] [--kills N] [--upgrades N]
#                                 [--duration DURATION] [--out DIR]
#
#   6.1   the newest linux-image-6.1.*-amd64 of Debian 12 (bookworm, the host's archive)
#   5.10  the newest linux-image-5.10.*-amd64 of Debian 11 (bullseye), if the archive
#         still serves it (a private apt configuration: the host's sources are untouched)
#
# Prints one verdict line per kernel; the exit status is non-zero if any kernel saw an
# application error, a lost record, a fault that did not recover, or did not finish. The
# guest's console output is kept in --out (default: a new directory under /tmp), and
# printed when a kernel fails. Kernel packages are cached in $BATON_TEST_CACHE/kernels
# (default /var/cache/baton-test). Run as root on Debian with a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

KERNELS=6.1
KILLS=12
UPGRADES=6
DURATION=6m
OUT=
while [ $# -gt 0 ]; do
    case "$1" in
    --kernels) KERNELS="$2"; shift 2 ;;
    --kills) KILLS="$2"; shift 2 ;;
    --upgrades) UPGRADES="$2"; shift 2 ;;
    --duration) DURATION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "kernel-matrix: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$KILLS$UPGRADES" in *[!0-9]*) echo "kernel-matrix: --kills and --upgrades take numbers" >&2; exit 2 ;; esac

if [ "$(id -u)" != 0 ]; then
    echo "kernel-matrix: run as root (apt, and the guest's image is built from root-owned files)" >&2
    exit 1
fi

CACHE="${BATON_TEST_CACHE:-/var/cache/baton-test}/kernels"
OUT="${OUT:-$(mktemp -d /tmp/baton-kernel-matrix.XXXXXX)}"
mkdir -p "$CACHE" "$OUT"

apt_install() {
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx insmod || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt_install "${missing[@]}"
fi

echo "== building the release binaries (baton, baton-fs, baton-chaos)"
cargo build --release --locked -q -p supervisor -p fsclient -p upgrade-tests \
    --bin baton --bin baton-fs --bin baton-chaos
BIN="$(pwd)/target/release"

# apt for another Debian release, without touching the host's configuration.
private_apt() {
    local suite="$1"
    local dir="$CACHE/apt-$suite"
    mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/cache"
    cat >"$dir/sources.list" <<EOF
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security $suite-security main
EOF
    APT_ARGS=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache"
        -o "Dir::Cache::Archives=$dir/archives")
    apt-get "${APT_ARGS[@]}" update -qq >/dev/null
}

# Prints the directory holding boot/vmlinuz-* and the modules of the newest kernel package
# of `series` (6.1, 5.10), downloading and unpacking it once.
kernel_tree() {
    local series="$1"
    APT_ARGS=()
    case "$series" in
    6.1) ;;
    5.10) private_apt bullseye || return 1 ;;
    *) echo "kernel-matrix: no Debian kernel series $series (6.1 or 5.10)" >&2; return 1 ;;
    esac
    local re="^linux-image-${series//./\\.}\\.0-[0-9]+-amd64\$"
    local pkg
    pkg=$(apt-cache "${APT_ARGS[@]}" search --names-only "$re" | awk '{print $1}' | sort -V | tail -1)
    if [ -z "$pkg" ] && [ "$series" = 6.1 ]; then
        APT_UPDATED=
        apt-get update -qq
        pkg=$(apt-cache search --names-only "$re" | awk '{print $1}' | sort -V | tail -1)
    fi
    if [ -z "$pkg" ]; then
        echo "kernel-matrix: the archive serves no $re" >&2
        return 1
    fi
    local tree="$CACHE/$pkg"
    if [ ! -d "$tree/boot" ]; then
        local dl
        dl=$(mktemp -d "$CACHE/dl.XXXXXX")
        chmod 755 "$dl" # apt downloads as the _apt user
        (cd "$dl" && apt-get "${APT_ARGS[@]}" download -qq "$pkg" 2>/dev/null)
        rm -rf "$tree.partial"
        dpkg-deb -x "$dl"/"$pkg"_*.deb "$tree.partial"
        rm -rf "$dl"
        mv "$tree.partial" "$tree"
    fi
    echo "$tree"
}

# The guest's /init: mount, run baton-chaos, print the report between markers, power off.
guest_init() {
    cat <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin HOME=/tmp BATON_HOME=/tmp/baton RUST_LOG=info
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
ip link set lo up 2>/dev/null
echo "guest: \$(uname -r), \$(nproc) CPUs, \$(awk '/MemTotal/ {print \$2 / 1024 " MiB"}' /proc/meminfo)"
insmod /lib/modules/fuse.ko || echo "guest: insmod fuse.ko failed"
mkdir -p /mnt/baton
run() {
    if ! baton mount /mnt/baton --background; then
        echo "guest: baton mount failed"
        cat /tmp/baton/log/*.log 2>/dev/null | tail -50
        return 1
    fi
    baton status /mnt/baton
    baton-chaos /mnt/baton --duration $DURATION --kills $KILLS --upgrades $UPGRADES \\
        --kill-every 3s --upgrade-every 7s --small --seed 61 --recover-timeout 120s \\
        --upgrade-timeout 120 --json=/tmp/report.json
    echo "guest: baton-chaos exited \$?"
    # Proof that the kills were answered from the request log (no resend on this kernel).
    echo "BATON-LOG-RECOVERIES \$(cat /tmp/baton/log/*.log | grep -c 'answering the requests the predecessor read and left unanswered')"
    baton status /mnt/baton
    baton umount /mnt/baton || echo "guest: umount failed"
}
run
echo "BATON-REPORT-BEGIN"
cat /tmp/report.json 2>/dev/null
echo "BATON-REPORT-END"
if [ -f /tmp/report.json ]; then :; else
    echo "guest: no report; the supervisor's log:"
    cat /tmp/baton/log/*.log 2>/dev/null | tail -80
fi
sync
poweroff -f
echo o > /proc/sysrq-trigger
EOF
}

# Copies `binary` and the shared libraries it loads into the image at `root`.
add_binary() {
    local root="$1" binary="$2"
    cp "$binary" "$root/bin/"
    ldd "$binary" | awk '/=>/ {print $3} /^\t\// {print $1}' | while read -r lib; do
        [ -f "$lib" ] || continue
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
}

# Prints the verdict line for one kernel from the guest's console log; fails on a bad run.
verdict() {
    local kernel="$1" console="$2"
    python3 - "$kernel" "$console" "$KILLS" "$UPGRADES" <<'EOF'
import json, re, sys
kernel, console, kills, upgrades = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(console, errors="replace").read()
m = re.search(r"BATON-REPORT-BEGIN\r?\n(.*?)BATON-REPORT-END", text, re.S)
try:
    r = json.loads(m.group(1)) if m else None
except ValueError:
    r = None
if r is None:
    print(f"kernel {kernel}: FAILED — no report from the guest (see {console})")
    sys.exit(1)
k = r.get("faults_by_kind", {})
def n(key):
    v = r.get(key, 0)
    return v if isinstance(v, (int, float)) else 0
kill = k.get("kill", {})
up = k.get("upgrade", {})
problems = []
for key in ("errors", "check_failures", "records_lost", "records_corrupted",
            "records_duplicated", "records_out_of_order"):
    if n(key):
        problems.append(f"{key} {n(key)}")
if r.get("verdict") != "clean":
    problems.append(f"verdict {r.get('verdict')}")
if r.get("stuck"):
    problems.append(f"stuck {r.get('stuck')}")
if kill.get("ok", 0) < kills:
    problems.append(f"{kill.get('ok', 0)} of {kills} kills recovered")
if up.get("ok", 0) < upgrades:
    problems.append(f"{up.get('ok', 0)} of {upgrades} upgrades done")
if "resend unavailable" not in text:
    problems.append("the guest's mount did not say `resend unavailable`")
rec = re.search(r"BATON-LOG-RECOVERIES (\d+)", text)
recoveries = int(rec.group(1)) if rec else 0
if recoveries == 0:
    problems.append("no successor answered anything from the request log")
def ms(d, key):
    v = d.get(key)
    return f"{v:.0f}" if isinstance(v, (int, float)) else "?"
line = (f"kernel {kernel}: {'PASS' if not problems else 'FAILED'} — "
        f"{kill.get('ok', 0)} kills, {up.get('ok', 0)} upgrades, {n('operations')} operations, "
        f"{n('errors')} errors, {n('records_lost')} of {n('records_acknowledged')} acknowledged records lost; "
        f"kill pause p50/p99/max {ms(kill, 'pause_p50_ms')}/{ms(kill, 'pause_p99_ms')}/{ms(kill, 'pause_max_ms')} ms, "
        f"upgrade pause p50/max {ms(up, 'pause_p50_ms')}/{ms(up, 'pause_max_ms')} ms (TCG); "
        f"{recoveries} successors answered requests from the request log")
if problems:
    line += "; " + ", ".join(problems)
print(line)
sys.exit(1 if problems else 0)
EOF
}

status=0
verdicts=()
IFS=, read -ra series_list <<<"$KERNELS"
for series in "${series_list[@]}"; do
    echo "== kernel $series"
    if ! tree=$(kernel_tree "$series"); then
        verdicts+=("kernel $series: FAILED — no kernel package")
        status=1
        continue
    fi
    vmlinuz=$(ls "$tree"/boot/vmlinuz-* | head -1)
    release=${vmlinuz##*/vmlinuz-}
    fuse_ko=$(find "$tree/lib/modules/$release" -name 'fuse.ko*' | head -1)
    root=$(mktemp -d /tmp/baton-guest.XXXXXX)
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,mnt,lib/modules,etc}
    cp /bin/busybox "$root/bin/busybox"
    case "$fuse_ko" in
    *.xz) xz -dc "$fuse_ko" >"$root/lib/modules/fuse.ko" ;;
    *.zst) zstd -qdc "$fuse_ko" >"$root/lib/modules/fuse.ko" ;;
    *) cp "$fuse_ko" "$root/lib/modules/fuse.ko" ;;
    esac
    for b in baton baton-fs baton-chaos; do
        add_binary "$root" "$BIN/$b"
    done
    guest_init >"$root/init"
    chmod 755 "$root/init"
    initrd="$OUT/initramfs-$release.cpio.gz"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$initrd")
    rm -rf "$root"
    console="$OUT/console-$release.log"
    echo "== booting $release under QEMU (TCG, 2 vCPUs): console in $console"
    started=$(date +%s)
    if ! timeout 30m qemu-system-x86_64 -machine q35 -accel tcg,thread=multi -cpu max -smp 2 -m 3072 \
        -kernel "$vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 rdinit=/init panic=-1 quiet" \
        -nographic -no-reboot -monitor none -serial "file:$console" >/dev/null 2>&1; then
        echo "kernel-matrix: QEMU did not finish in time for $release" >&2
    fi
    echo "== $release: guest ran $(($(date +%s) - started)) s"
    if v=$(verdict "$release" "$console"); then
        verdicts+=("$v")
    else
        verdicts+=("$v")
        status=1
        echo "---- guest console ($console), last 120 lines:"
        tail -120 "$console" || true
        echo "----"
    fi
done
echo
for v in "${verdicts[@]}"; do
    echo "$v"
done
exit $status
