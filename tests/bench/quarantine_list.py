"""Benchmark: `virusgw quarantine list` over 100,000 entries, through the
SQLite index versus reading every meta.json.

    .venv/bin/python tests/bench/quarantine_list.py [--entries N] [--rounds R]
                                                    [--dir PARENT] [--keep] [--json PATH]

The store is filled once: the first entries through Store.add (the real
path, fsyncs included, timed as adds per second), the rest cloned from them
with the same layout and varied metadata but without fsync (100,000 fsynced
adds would take minutes and measure the disk, not the list).  Then, each
round, side by side:

  scan       read and parse every meta.json (what list would do without an index)
  build      Index.select() with no index: the same reads plus the inserts (the index
             file is removed first)
  index      Index.select() with the index present: one listdir to stay consistent, one
             SELECT; the rows carry their JSON text (what --json prints)
  filtered   Index.select(protocol=smtp, state=quarantined, virus=*trojan*)
  cli-json   the real bin/virusgw quarantine list --json > /dev/null
  cli-50     the real bin/virusgw quarantine list --limit 50 (a person's look)

Medians over the rounds.  This is not a test: `make test` never runs it.
"""

import argparse
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO]

from scanlib import quarantine as q          # noqa: E402

VIRUSGW = os.path.join(os.path.dirname(sys.executable), "virusgw")
VIRUSES = ["VirusGW.Test.EICAR.UNOFFICIAL", "Win.Trojan.Agent-123", "Doc.Dropper.X-9",
           "Heuristics.Limits.Exceeded.MaxFileSize"]


def log(msg):
    print("[quarantine-bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def fill(directory, n, real):
    store = q.Store(directory)
    t0 = time.perf_counter()
    for i in range(min(real, n)):
        store.add(io.BytesIO(b"X" * (100 + i)), meta_for(i))
    real_s = time.perf_counter() - t0
    base = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=60)
    for i in range(real, n):
        when = base + datetime.timedelta(seconds=i * 50)
        qid = q.new_id(when)
        d = os.path.join(directory, qid)
        os.mkdir(d, 0o750)
        body = b"X" * (100 + i % 5000)
        with open(os.path.join(d, "content"), "wb") as f:
            f.write(body)
        meta = meta_for(i)
        import hashlib
        meta.update(id=qid, created=q.utc_text(when), size=len(body),
                    sha256=hashlib.sha256(body).hexdigest(),
                    state="quarantined" if i % 7 else "blocked", history=[])
        with open(os.path.join(d, "meta.json"), "wb") as f:
            f.write(q._dump(meta))
    store.recount()
    return real_s


def meta_for(i):
    if i % 4 == 3:
        return {"protocol": "ftp", "direction": "inbound" if i % 2 else "outbound",
                "client": "192.0.2.%d" % (i % 250), "ftp_user": "user%d" % (i % 50),
                "ftp_server": "198.51.100.%d" % (i % 200), "ftp_path": "/pub/f%d.exe" % i,
                "filename": "f%d.exe" % i, "viruses": [VIRUSES[i % 4]], "action": "quarantine",
                "reason": "infected", "rule": "ftp.action=quarantine",
                "scanner_version": "ClamAV 1.4.6/27000"}
    return {"protocol": "smtp", "direction": "inbound" if i % 2 else "outbound",
            "client": "192.0.2.%d" % (i % 250), "sender": "sender%d@example.org" % (i % 1000),
            "recipients": ["rcpt%d@example.com" % (i % 300), "other@example.com"],
            "subject": "Invoice %d" % i, "message_id": "<%d@example.org>" % i,
            "filename": "invoice%d.pdf.exe" % i, "viruses": [VIRUSES[i % 4]],
            "action": "quarantine", "reason": "infected", "rule": "smtp.inbound.action=quarantine",
            "scanner_version": "ClamAV 1.4.6/27000", "portion": "1.2",
            "content_type": "application/octet-stream"}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=100000)
    ap.add_argument("--real", type=int, default=500, help="entries made through Store.add")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp", help="parent folder for the temp store")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()

    base = tempfile.mkdtemp(prefix="virusgw-qbench-", dir=args.dir)
    qdir = os.path.join(base, "quarantine")
    conf = os.path.join(base, "virusgw.conf")
    with open(conf, "w") as f:
        f.write("[quarantine]\ndirectory = %s\n[spool]\ndirectory = %s\n[log]\nfile = %s\n"
                % (qdir, base, os.path.join(base, "log")))
    results = {"entries": args.entries, "rounds": args.rounds}
    try:
        log("filling %d entries in %s (%d through Store.add)" % (args.entries, qdir, args.real))
        t0 = time.perf_counter()
        real_s = fill(qdir, args.entries, args.real)
        results["adds_per_s"] = args.real / real_s if real_s else None
        log("filled in %.1f s; Store.add: %.0f adds/s (fsynced)"
            % (time.perf_counter() - t0, results["adds_per_s"] or 0))
        store = q.Store(qdir)
        series = {k: [] for k in ("scan", "build", "index", "filtered", "cli-json", "cli-50")}
        counts = {}
        for r in range(args.rounds):
            s, rows = timed(lambda: q.scan_rows(store))
            series["scan"].append(s)
            counts["scan"] = len(rows)
            for suffix in ("", "-journal"):
                try:
                    os.unlink(os.path.join(qdir, q.INDEX_NAME + suffix))
                except FileNotFoundError:
                    pass
            ix = q.Index(store)
            s, rows = timed(lambda: list(ix.select()))
            ix.close()
            series["build"].append(s)
            counts["build"] = len(rows)
            ix = q.Index(store)
            s, rows = timed(lambda: list(ix.select()))
            series["index"].append(s)
            counts["index"] = len(rows)

            def filtered():
                return list(ix.select(q.Filter(protocol="smtp", state="quarantined",
                                               virus="*trojan*")))
            s, rows = timed(filtered)
            ix.close()
            series["filtered"].append(s)
            counts["filtered"] = len(rows)
            for name, extra in (("cli-json", ["--json"]), ("cli-50", ["--limit", "50"])):
                with open(os.devnull, "wb") as devnull:
                    s, p = timed(lambda: subprocess.run(
                        [VIRUSGW, "quarantine", "list", "-c", conf] + extra,
                        stdout=devnull, stderr=subprocess.PIPE, timeout=600))
                if p.returncode != 0:
                    log("%s failed: %s" % (name, p.stderr.decode(errors="replace").strip()))
                series[name].append(s)
            log("round %d: scan %.2fs build %.2fs index %.2fs filtered %.2fs cli-json %.2fs "
                "cli-50 %.2fs" % (r + 1, *(series[k][-1] for k in series)))
        assert counts["scan"] == counts["build"] == counts["index"] == args.entries, counts
        med = {k: statistics.median(v) for k, v in series.items()}
        results["median_s"] = med
        results["counts"] = counts
        results["speedup_index_vs_scan"] = med["scan"] / med["index"] if med["index"] else None
        print()
        print("%-10s %10s  %s" % ("what", "median s", "rows"))
        for k, v in med.items():
            print("%-10s %10.3f  %s" % (k, v, counts.get(k, "")))
        print("index vs reading every meta.json: %.1fx faster"
              % results["speedup_index_vs_scan"])
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        if args.keep:
            log("kept %s" % base)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
