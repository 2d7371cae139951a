#!/usr/bin/env python3
"""Benchmark: scan one big file (default 1 GiB) by stream and by fildes with
scanlib.scanner, and with clamdscan on the same file, against a private clamd
whose limits are raised to hold it (clamd cannot scan past 2 GB).

For each way it prints the wall time, the time relative to plain
`clamdscan` (clamd opens the path itself) and the peak RSS of the scanning
process, which must stay under 60 MB for our methods: the file is never
held in memory.  The file ends with the EICAR string, so a verdict other
than infected means the whole file was not scanned.

Run by hand (not part of `make test`):
    .venv/bin/python tests/bench/scan_big.py [--size-mib 1024] [--dir /tmp] [--rounds 1]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from tests.rig import clamd as rig  # noqa: E402

RSS_LIMIT_MB = 60

CHILD = r"""
import json, resource, sys, time
from scanlib.scanner import Scanner
endpoint, method, path = sys.argv[1:4]
s = Scanner([endpoint], method=method, timeout=3600, max_size=1 << 31)
t0 = time.monotonic()
v = s.scan_file(path)
print(json.dumps({"seconds": time.monotonic() - t0, "verdict": repr(v),
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_file(path, size):
    """size bytes: a 1 MiB random block repeated (cheap to write, not
    trivially compressible to clamd's eyes), EICAR at the very end."""
    block = os.urandom(1 << 20)
    tail = rig.EICAR
    left = size - len(tail)
    with open(path, "wb") as f:
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.write(tail)


def ours(c, endpoint, method, path):
    """Scan in a fresh process (its peak RSS is the scanner's alone)."""
    p = subprocess.run([sys.executable, "-c", CHILD, endpoint, method, path],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit("scanner child failed: %s" % p.stderr)
    out = p.stdout
    rec = json.loads(out)
    return rec["seconds"], rec["maxrss_kb"] / 1024.0, rec["verdict"]


def clamdscan(c, path, *flags):
    binary = shutil.which("clamdscan")
    argv = ["/usr/bin/time", "-f", "%M"] if os.path.exists("/usr/bin/time") else []
    argv += [binary, "--config-file=%s" % c.conf_path, "--no-summary"] + list(flags) + [path]
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True)
    wall = time.monotonic() - t0
    rss = None
    if argv[0] == "/usr/bin/time":
        try:
            rss = int(p.stderr.strip().splitlines()[-1]) / 1024.0
        except (ValueError, IndexError):
            pass
    return wall, rss, p.stdout.strip().rsplit(": ", 1)[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", default=None, help="where the big file goes (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    size = args.size_mib << 20
    if size >= 2 << 30:
        raise SystemExit("clamd cannot scan 2 GB or more")
    work = tempfile.mkdtemp(prefix="vgw-scanbig-", dir=args.dir)
    limit = "%dM" % (args.size_mib + 64)
    c = rig.Clamd(os.path.join(work, "clamd"),
                  limits={"StreamMaxLength": limit, "MaxFileSize": limit, "MaxScanSize": limit},
                  extra={"ReadTimeout": "3600", "CommandReadTimeout": "60"})
    try:
        path = os.path.join(work, "big.bin")
        print("writing %d MiB to %s ..." % (args.size_mib, path), flush=True)
        make_file(path, size)
        c.start()
        print("clamd pid %d, %s" % (c.pid, " ".join(c.endpoints)), flush=True)
        # warm the page cache once so that every way reads from memory
        clamdscan(c, path)
        ways = [
            ("clamdscan (SCAN path)", lambda: clamdscan(c, path)),
            ("clamdscan --fdpass", lambda: clamdscan(c, path, "--fdpass")),
            ("clamdscan --stream", lambda: clamdscan(c, path, "--stream")),
            ("virusgw fildes (unix)", lambda: ours(c, c.unix_endpoint, "fildes", path)),
            ("virusgw stream (unix)", lambda: ours(c, c.unix_endpoint, "stream", path)),
            ("virusgw stream (tcp)", lambda: ours(c, c.tcp_endpoint, "stream", path)),
            ("virusgw path (unix)", lambda: ours(c, c.unix_endpoint, "path", path)),
        ]
        results = {}
        for _ in range(args.rounds):
            for name, fn in ways:
                secs, rss, verdict = fn()
                best = results.get(name)
                if best is None or secs < best[0]:
                    results[name] = (secs, rss, verdict)
        base = results["clamdscan (SCAN path)"][0]
        print()
        print("%-24s %9s %9s %9s  %s" % ("way", "seconds", "relative", "peak RSS", "verdict"))
        failed = []
        for name, _ in ways:
            secs, rss, verdict = results[name]
            rss_text = "%6.1f MB" % rss if rss is not None else "       ?"
            print("%-24s %9.2f %8.2fx %9s  %s" % (name, secs, secs / base, rss_text, verdict))
            if name.startswith("virusgw"):
                if rss is None or rss >= RSS_LIMIT_MB:
                    failed.append("%s: peak RSS %s >= %d MB" % (name, rss, RSS_LIMIT_MB))
                if "EICAR" not in verdict:
                    failed.append("%s: %s (the EICAR at the end was not reached)"
                                  % (name, verdict))
        print()
        if failed:
            print("FAILED:\n  " + "\n  ".join(failed))
            return 1
        print("ok: every virusgw way found the EICAR at the end, peak RSS < %d MB" % RSS_LIMIT_MB)
        return 0
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
