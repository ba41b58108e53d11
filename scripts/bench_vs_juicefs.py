#!/usr/bin/env python3
"""Baton against JuiceFS and the local disk, side by side, in one run.

Systems: Baton on its embedded engine (redb), Baton on Redis, JuiceFS on Redis, and a
directory of the local disk (ext4). Object data of Baton and JuiceFS goes to a local
directory (Baton `fs://`, JuiceFS `--storage file`), so every system writes to the same
disk. One redis-server (no persistence) is started for the run; Baton uses its db 2,
JuiceFS its db 1. Each system runs every test in turn; the rounds rotate the order, and the
table gives each test's median over the rounds.

Cold reads remount Baton and JuiceFS with an emptied block cache and drop the page cache,
so the bytes come from the object store; ext4 gets the dropped page cache.

Run through scripts/bench-vs-juicefs.sh (it installs the tools and builds Baton). Everything
started here is stopped at exit, also on an error or Ctrl-C.
"""

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1 << 20

# (key, label, unit, higher_is_better)
TESTS = [
    ("seq-write", "seq write, 1 MiB writes + fsync", "MiB/s", True),
    ("seq-read", "seq read, cold (1 MiB reads)", "MiB/s", True),
    ("stream4-write", "4 streams seq write + fsync", "MiB/s", True),
    ("stream4-read", "4 streams seq read, cold", "MiB/s", True),
    ("rand-read-1", "4 KiB random read, 1 job", "IOPS", True),
    ("rand-read-4", "4 KiB random read, 4 jobs", "IOPS", True),
    ("create-1", "create 1 KiB files, 1 process", "files/s", True),
    ("create-4", "create 1 KiB files, 4 processes", "files/s", True),
    ("small-create-1", "64-256 KiB files: create+write+close, 1 process", "files/s", True),
    ("small-stat-1", "64-256 KiB files: stat, cold, 1 process", "files/s", True),
    ("small-read-1", "64-256 KiB files: open+read+close, cold, 1 process", "files/s", True),
    ("small-unlink-1", "64-256 KiB files: unlink, 1 process", "files/s", True),
    ("small-create-4", "64-256 KiB files: create+write+close, 4 processes", "files/s", True),
    ("small-stat-4", "64-256 KiB files: stat, cold, 4 processes", "files/s", True),
    ("small-read-4", "64-256 KiB files: open+read+close, cold, 4 processes", "files/s", True),
    ("small-unlink-4", "64-256 KiB files: unlink, 4 processes", "files/s", True),
    ("tail-fsync-p99", "fsync p99, 4 writers of 64 KiB files", "ms", False),
    ("tail-close-p99", "close p99, 4 writers of 64 KiB files", "ms", False),
    ("tail-max", "slowest fsync or close, 4 writers", "ms", False),
]
GROUPS = {
    "seq": ["seq-write", "seq-read"],
    "stream4": ["stream4-write", "stream4-read"],
    "rand": ["rand-read-1", "rand-read-4"],
    "create": ["create-1", "create-4"],
    "small": [k for k, *_ in TESTS if k.startswith("small-")],
    "tail": ["tail-fsync-p99", "tail-close-p99", "tail-max"],
}
SYSTEMS = ["baton-redb", "baton-redis", "juicefs-redis", "ext4"]
LABELS = {
    "baton-redb": "Baton redb",
    "baton-redis": "Baton Redis",
    "juicefs-redis": "JuiceFS Redis",
    "ext4": "ext4",
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd, env=None, check=True):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def is_mountpoint(path):
    return subprocess.run(["mountpoint", "-q", path]).returncode == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self, workdir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def url(self, db):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class System:
    """A filesystem under test: `root` is where the tests write."""

    name = ""

    def __init__(self, workdir):
        self.dir = os.path.join(workdir, self.name)
        self.mnt = os.path.join(self.dir, "mnt")
        self.cache = os.path.join(self.dir, "cache")
        os.makedirs(self.mnt, exist_ok=True)
        self.mounted = False

    @property
    def root(self):
        return self.mnt

    def remount_cold(self):
        self.umount()
        shutil.rmtree(self.cache, ignore_errors=True)
        os.makedirs(self.cache, exist_ok=True)
        self.mount()
        drop_caches()

    def force_umount(self):
        if is_mountpoint(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)


class Baton(System):
    def __init__(self, workdir, bindir, engine, redis):
        self.name = f"baton-{engine}"
        super().__init__(workdir)
        self.baton = os.path.join(bindir, "baton")
        self.env = dict(os.environ, BATON_HOME=os.path.join(self.dir, "home"))
        if engine == "redb":
            self.meta = f"redb://{self.dir}/meta.redb"
        else:
            self.meta = redis.url(2)
        storage = f"fs://{self.dir}/data"
        run([self.baton, "format", "bench", "--meta", self.meta, "--storage", storage],
            env=self.env)

    def mount(self):
        os.makedirs(self.cache, exist_ok=True)
        run([self.baton, "mount", self.mnt, "--meta", self.meta, "--background",
             "--cache-dir", self.cache], env=self.env)
        self.mounted = True

    def umount(self):
        if not self.mounted:
            return
        for _ in range(100):
            p = run([self.baton, "umount", self.mnt], env=self.env, check=False)
            if p.returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"baton umount {self.mnt}: {p.stderr}")
        self.mounted = False

    def version(self):
        return run([self.baton, "--version"], env=self.env).stdout.strip()


class JuiceFS(System):
    name = "juicefs-redis"

    def __init__(self, workdir, redis):
        super().__init__(workdir)
        self.meta = redis.url(1)
        # --trash-days 0: an unlink frees the data, as it does on Baton.
        run(["juicefs", "format", "--storage", "file", "--bucket", self.dir + "/data/",
             "--trash-days", "0", "--no-update", self.meta, "bench"])

    def mount(self):
        os.makedirs(self.cache, exist_ok=True)
        run(["juicefs", "mount", "-d", "--no-usage-report", "--cache-dir",
             self.cache, "--log", os.path.join(self.dir, "juicefs.log"), self.meta, self.mnt])
        self.mounted = True

    def umount(self):
        if not self.mounted:
            return
        run(["juicefs", "umount", self.mnt])
        self.mounted = False

    def version(self):
        return run(["juicefs", "--version"]).stdout.strip()


class Ext4(System):
    name = "ext4"

    def mount(self):
        self.mounted = True

    def umount(self):
        self.mounted = False

    def remount_cold(self):
        drop_caches()

    def force_umount(self):
        pass

    def version(self):
        return "local " + run(["findmnt", "-no", "FSTYPE", "-T", self.mnt]).stdout.strip()


# ---- workers (run in child processes) -------------------------------------------------

def _pattern(size):
    return bytes((i * 2654435761 >> 13) & 0xFF for i in range(size))


def write_file(path, size, chunk):
    buf = _pattern(chunk)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, chunk)
            f.write(buf[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())


def read_file(path, chunk=MIB):
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                return total
            total += len(b)


def small_sizes(n, seed):
    r = random.Random(seed)
    return [r.randrange(64, 257) * 1024 for _ in range(n)]


def w_create(d, n, size):
    data = b"x" * size
    for i in range(n):
        with open(os.path.join(d, f"f{i:06}"), "wb") as f:
            f.write(data)


def w_small_create(d, n, seed):
    data = _pattern(256 * 1024)
    for i, s in enumerate(small_sizes(n, seed)):
        with open(os.path.join(d, f"f{i:06}"), "wb") as f:
            f.write(data[:s])


def w_small_stat(d, n, seed):
    for i in range(n):
        os.stat(os.path.join(d, f"f{i:06}"))


def w_small_read(d, n, seed):
    sizes = small_sizes(n, seed)
    for i in range(n):
        with open(os.path.join(d, f"f{i:06}"), "rb", buffering=0) as f:
            got = len(f.read(300 * 1024))
        if got != sizes[i]:
            raise RuntimeError(f"{d}/f{i:06}: read {got} bytes, wrote {sizes[i]}")


def w_unlink(d, n, seed):
    for i in range(n):
        os.unlink(os.path.join(d, f"f{i:06}"))


def w_tail(d, seconds):
    data = _pattern(64 * 1024)
    fs, cl = [], []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        fd = os.open(os.path.join(d, f"t{i:06}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.write(fd, data)
        t = time.perf_counter()
        os.fsync(fd)
        t1 = time.perf_counter()
        os.close(fd)
        t2 = time.perf_counter()
        fs.append(t1 - t)
        cl.append(t2 - t1)
        i += 1
    return fs, cl


def _child(barrier, fn, args, resq):
    try:
        barrier.wait()
        resq.put((True, fn(*args)))
    except BaseException as e:  # reported to the parent, which fails the test
        resq.put((False, f"{type(e).__name__}: {e}"))


def parallel(fn, arglists):
    """Runs fn(*args) for each args in its own process, started together; returns the
    wall time from the common start to the last finish, and what each call returned."""
    barrier = mp.Barrier(len(arglists) + 1)
    resq = mp.Queue()
    procs = [mp.Process(target=_child, args=(barrier, fn, a, resq)) for a in arglists]
    for p in procs:
        p.start()
    barrier.wait()
    t = time.perf_counter()
    # Read every result before joining: a child exits only once its queue is drained.
    res = [resq.get() for _ in procs]
    d = time.perf_counter() - t
    for p in procs:
        p.join()
    errs = [v for ok, v in res if not ok]
    if errs:
        raise RuntimeError("; ".join(errs))
    return d, [v for _, v in res]


def fresh_dir(sysm, name):
    d = os.path.join(sysm.root, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


# ---- tests ---------------------------------------------------------------------------

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round((len(xs) - 1) * p))] if xs else 0.0


def run_tests(sysm, want, a, out):
    seq = int(1024 * a.scale) * MIB
    stream = int(256 * a.scale) * MIB
    ncreate = max(50, int(2000 * a.scale))
    nsmall = max(50, int(1000 * a.scale))

    def rec(key, value):
        out.setdefault(key, {}).setdefault(sysm.name, []).append(value)
        unit = next(u for k, _, u, _ in TESTS if k == key)
        log(f"  {sysm.name:14} {key:16} {value:10.1f} {unit}")

    if want & {"seq-write", "seq-read", "rand-read-1", "rand-read-4"}:
        d = fresh_dir(sysm, "seq")
        big = os.path.join(d, "big")
        d_w, _ = parallel(write_file, [(big, seq, MIB)])
        if "seq-write" in want:
            rec("seq-write", seq / MIB / d_w)
        if "seq-read" in want:
            sysm.remount_cold()
            d_r, _ = parallel(read_file, [(big,)])
            rec("seq-read", seq / MIB / d_r)
        for jobs in (1, 4):
            key = f"rand-read-{jobs}"
            if key not in want:
                continue
            p = run(["fio", "--name=rr", f"--filename={big}", "--rw=randread", "--bs=4k",
                     "--ioengine=psync", f"--numjobs={jobs}", "--runtime=10",
                     "--time_based", "--group_reporting", "--output-format=json",
                     "--invalidate=1"])
            rep = json.loads(p.stdout[p.stdout.index("{"):])
            rec(key, rep["jobs"][0]["read"]["iops"])
        shutil.rmtree(d)

    if want & {"stream4-write", "stream4-read"}:
        d = fresh_dir(sysm, "stream")
        files = [os.path.join(d, f"s{i}") for i in range(4)]
        dw, _ = parallel(write_file, [(f, stream, MIB) for f in files])
        if "stream4-write" in want:
            rec("stream4-write", 4 * stream / MIB / dw)
        if "stream4-read" in want:
            sysm.remount_cold()
            dr, _ = parallel(read_file, [(f,) for f in files])
            rec("stream4-read", 4 * stream / MIB / dr)
        shutil.rmtree(d)

    for procs in (1, 4):
        key = f"create-{procs}"
        if key in want:
            d = fresh_dir(sysm, "create")
            dirs = [os.path.join(d, f"p{i}") for i in range(procs)]
            for x in dirs:
                os.makedirs(x)
            n = ncreate // procs
            t, _ = parallel(w_create, [(x, n, 1024) for x in dirs])
            rec(key, n * procs / t)
            shutil.rmtree(d)

    for procs in (1, 4):
        keys = [f"small-{op}-{procs}" for op in ("create", "stat", "read", "unlink")]
        if not want & set(keys):
            continue
        d = fresh_dir(sysm, "small")
        dirs = [os.path.join(d, f"p{i}") for i in range(procs)]
        for x in dirs:
            os.makedirs(x)
        n = nsmall // procs
        args = [(x, n, i) for i, x in enumerate(dirs)]
        t, _ = parallel(w_small_create, args)
        if keys[0] in want:
            rec(keys[0], n * procs / t)
        sysm.remount_cold()
        t, _ = parallel(w_small_stat, args)
        if keys[1] in want:
            rec(keys[1], n * procs / t)
        sysm.remount_cold()
        t, _ = parallel(w_small_read, args)
        if keys[2] in want:
            rec(keys[2], n * procs / t)
        t, _ = parallel(w_unlink, args)
        if keys[3] in want:
            rec(keys[3], n * procs / t)
        shutil.rmtree(d)

    if want & set(GROUPS["tail"]):
        d = fresh_dir(sysm, "tail")
        dirs = [os.path.join(d, f"w{i}") for i in range(4)]
        for x in dirs:
            os.makedirs(x)
        _, lats = parallel(w_tail, [(x, a.tail_seconds) for x in dirs])
        fs = [x for f, _ in lats for x in f]
        cl = [x for _, c in lats for x in c]
        rec("tail-fsync-p99", pct(fs, 0.99) * 1000)
        rec("tail-close-p99", pct(cl, 0.99) * 1000)
        rec("tail-max", max(fs + cl) * 1000)
        shutil.rmtree(d)


# ---- report --------------------------------------------------------------------------

def fmt(v, unit):
    if v is None:
        return "–"
    if unit == "ms":
        return f"{v:.1f}"
    if v >= 10000:
        return f"{v / 1000:.1f}k"
    return f"{v:.0f}"


def table(results, systems):
    cols = [LABELS[s] for s in systems]
    baton = [s for s in systems if s.startswith("baton-")]
    jfs = "juicefs-redis" in systems
    head = ["test", "unit"] + cols
    if jfs:
        head += [f"{LABELS[s]} vs JuiceFS" for s in baton]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, unit, higher in TESTS:
        if key not in results:
            continue
        med = {s: statistics.median(results[key][s]) if results[key].get(s) else None
               for s in systems}
        row = [label, unit + ("" if higher else " (lower is better)")]
        row += [fmt(med[s], unit) for s in systems]
        if jfs:
            for s in baton:
                b, j = med[s], med["juicefs-redis"]
                if not b or not j:
                    row.append("–")
                else:
                    row.append(f"{(b / j if higher else j / b):.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baton-dir", required=True, help="directory of the baton binaries")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="sizes and counts × F (1.0: 1 GiB sequential, 4×256 MiB streams, "
                         "2000 creates, 1000 small files)")
    ap.add_argument("--tail-seconds", type=float, default=15.0)
    ap.add_argument("--only", default="",
                    help="tests or groups (" + ",".join(GROUPS) + "), comma-separated")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--workdir", default="/var/tmp",
                    help="where volumes, object data and caches go (default /var/tmp)")
    ap.add_argument("--json", help="also write the raw results to this file")
    a = ap.parse_args()

    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}; known: {', '.join(SYSTEMS)}")
    want = set()
    for w in filter(None, (x.strip() for x in a.only.split(","))):
        if w in GROUPS:
            want |= set(GROUPS[w])
        elif any(w == k for k, *_ in TESTS):
            want.add(w)
        else:
            ap.error(f"unknown test {w!r}; known groups: {', '.join(GROUPS)}")
    if not want:
        want = {k for k, *_ in TESTS}
    if a.rounds < 1 or a.scale <= 0:
        ap.error("--rounds must be ≥ 1 and --scale > 0")

    mp.set_start_method("fork")
    work = tempfile.mkdtemp(prefix="baton-vs-juicefs-", dir=a.workdir)
    redis = None
    mounted = []

    def cleanup(*_):
        for s in mounted:
            try:
                s.umount()
            except Exception as e:
                log(f"unmounting {s.name}: {e}; detaching it")
            s.force_umount()
        if redis:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    def on_signal(sig, _frame):
        raise KeyboardInterrupt(f"signal {sig}")

    signal.signal(signal.SIGTERM, on_signal)
    results = {}
    try:
        if any(s.endswith("-redis") for s in systems):
            redis = Redis(work)
        objs = []
        for s in systems:
            if s == "baton-redb":
                objs.append(Baton(work, a.baton_dir, "redb", redis))
            elif s == "baton-redis":
                objs.append(Baton(work, a.baton_dir, "redis", redis))
            elif s == "juicefs-redis":
                objs.append(JuiceFS(work, redis))
            else:
                objs.append(Ext4(work))
        for s in objs:
            s.mount()
            mounted.append(s)
        versions = {s.name: s.version() for s in objs}
        load = os.getloadavg()
        log(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        for r in range(a.rounds):
            order = objs[r % len(objs):] + objs[:r % len(objs)]
            log(f"round {r + 1}/{a.rounds}: {', '.join(s.name for s in order)}")
            for s in order:
                run_tests(s, want, a, results)
        load_after = os.getloadavg()
    finally:
        cleanup()

    try:
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    except Exception:
        commit = "?"
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit}; "
          f"{a.rounds} rounds, scale {a.scale}, median shown; load average before "
          f"{load[0]:.2f}, after {load_after[0]:.2f}")
    for s in systems:
        print(f"- {LABELS[s]}: {versions[s]}")
    print()
    print(table(results, systems))
    print()
    print("Ratios: Baton's result over JuiceFS's (for latencies, JuiceFS's over Baton's): "
          "above 1.00× Baton is faster.")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
