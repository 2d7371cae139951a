"""make bench: virusgw side by side with the gateways users run today.

Everything runs privately on loopback in one temp folder: one clamd (the
test signatures, limits raised for the big items), one SMTP sink that
counts and checksums every message, one FTP server, the peers (Debian's
clamsmtp and amavisd-new, installed here when missing), and virusgw's
proxies under systemd-socket-activate (one process per connection, as in
production).  Each load goes to every column, interleaved, the order
rotating each round; every figure is a median over the rounds with its
spread, and each target compares ratios taken within the same round, since
these machines are shared and noisy.

    python tests/bench/run.py [--quick] [--rounds N] [--only SECTION,...]
                              [--no-peers] [--no-profile] [--json PATH]

Sections: greet, smtp (sequential and 20 clients), big (10 MiB mail),
sessions (50 x 20), ftp, memory, profile.  Results: a table on stdout and
JSON in tests/bench/results.json (git-ignored).  Exit status 0 when the
bench ran (whatever PASS/MISS says), 1 when it could not run at all.
This is not a test: `make test` never runs it.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, HERE]

from tests.rig import activate as act          # noqa: E402
from tests.rig import clamd as rigclamd        # noqa: E402
from tests.rig import procs                    # noqa: E402
import load                                    # noqa: E402
import peers                                   # noqa: E402

VPY = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(VPY):
    VPY = sys.executable
MiB = 1 << 20

SMTP_COLUMNS = ("virusgw", "virusgw-prefork", "clamsmtp", "amavis", "sink")


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "n": len(values),
            "spread_pct": (100.0 * (max(values) - min(values)) / 2 / med) if med else 0.0}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- the rig -------------------------------------------------------------------

class Proc:
    """A helper process of ours (sink, FTP server), stopped by PID."""

    def __init__(self, argv, logpath, port):
        self.port = port
        with open(logpath, "ab") as out:
            self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        act.wait_until(lambda: self.p.poll() is not None or act._listening(self.p.pid, port),
                       timeout=20, what=" ".join(argv))
        if self.p.poll() is not None:
            raise RuntimeError("%s exited %s (see %s)" % (argv[1], self.p.returncode, logpath))

    def stop(self):
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.p.pid, signal.SIGKILL)
                self.p.wait()


def sink_cmd(port, line):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(line.encode() + b"\r\nQUIT\r\n")
        reply = f.readline().decode().strip()
        if not reply.startswith("250"):
            raise RuntimeError("sink said %r to %r" % (reply, line))
        return reply[4:]


class Account:
    """Every message of a load accounted for at the sink: arrived, once,
    with the body it was sent with."""

    def __init__(self, sink_port, workdir):
        self.port, self.dir, self.n = sink_port, workdir, 0

    def start(self):
        sink_cmd(self.port, "XCLEAR")

    def check(self, expected):
        self.n += 1
        path = os.path.join(self.dir, "sink-dump-%d.json" % self.n)
        sink_cmd(self.port, "XDUMP " + path)
        with open(path) as f:
            seen = json.load(f)
        os.unlink(path)
        lost = [t for t in expected if t not in seen]
        bad = [t for t, sha in expected.items() if t in seen and seen[t] != sha]
        return {"expected": len(expected), "arrived": len(expected) - len(lost),
                "lost": len(lost), "altered": len(bad)}


def vgw_config(workdir, clamd, sink_port, ftp_port, pasv):
    """virusgw's config for the bench: the shipped defaults except the
    private endpoints and the sizes the big items need (scanner max_size
    2000 MB for the 1 GiB file, smtp max_message_size 200 MiB for the 100 MB
    mail).  Timeouts stay at their defaults: a scanner timeout above the
    SMTP deadline would, for instance, put every scan in a worker thread."""
    text = ("[log]\nfile = %(log)s\nlevel = info\n"
            "[scanner]\nclamd = %(clamd)s\nmax_size = 2097152000\n"
            "[smtp]\nupstream = smtp:127.0.0.1:%(sink)d\nlocal_domains = bench.test\n"
            "max_message_size = 209715200\nhostname = virusgw.bench.test\n"
            "[ftp]\nupstream = tcp:127.0.0.1:%(ftp)d\npassive_ports = %(p0)d-%(p1)d\n"
            "hostname = virusgw.bench.test\n"
            % {"log": os.path.join(workdir, "virusgw.log"), "clamd": clamd.unix_endpoint,
               "sink": sink_port, "ftp": ftp_port, "p0": pasv, "p1": pasv + 199})
    return act.write_config(workdir, text)


def proxy_ready(host, port, banner=b"220"):
    try:
        t = load.greeting_times(host, port, 1)
        return t is not None
    except (OSError, load.LoadError) as e:
        return "no greeting: %s" % e


# -- loads ---------------------------------------------------------------------

def small_batches(prefix, n, per_conn=1):
    expected, batches = {}, []
    for c in range(n // per_conn):
        batch = []
        for m in range(per_conn):
            token = "%s-%d-%d" % (prefix, c, m)
            content = load.small_mail(token)
            expected[token] = load.body_sha(content)
            batch.append(load.stuff(content))
        batches.append(batch)
    return batches, expected


def mail_load(target, acct, prefix, n, clients, per_conn=1, steps=None, timeout=10.0):
    host, port = target
    batches, expected = small_batches(prefix, n, per_conn)
    acct.start()
    r = load.run_mail_load(host, port, batches, clients, timeout=timeout, steps=steps)
    r.update(acct.check(expected))
    # With errors (e.g. connections never greeted), the rate is what was
    # delivered over the time until the last success; the errors are listed.
    span = r["busy"] if r["errors"] else r["wall"]
    r["rate"] = (r["arrived"] / span) if span and r["arrived"] else None
    r.pop("latencies", None)
    r["errors"] = r["errors"][:5]
    return r


# -- the bench -----------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds or (2 if self.quick else 5)
        self.n_small = 50 if self.quick else 200
        self.res = {"meta": {
            "started": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
            "quick": self.quick, "rounds": self.rounds, "small_mails": self.n_small,
            "machine": "%s, %d cores, Python %s" % (platform.platform(), os.cpu_count(),
                                                     platform.python_version())},
            "columns": {}, "rows": {}, "targets": [], "profile": {}, "notes": []}
        self.targets = {}       # column -> (host, port) for SMTP
        self.ftp_proxy = None
        self.stack = contextlib.ExitStack()

    # -- set-up ----------------------------------------------------------------
    def setup(self):
        a = self.args
        self.tmp = tempfile.mkdtemp(prefix="vgw-bench-")
        os.chmod(self.tmp, 0o711)
        self.stack.callback(lambda: a.keep or shutil.rmtree(self.tmp, ignore_errors=True))
        log("work folder %s" % self.tmp)
        self.clamd = rigclamd.Clamd(
            os.path.join(self.tmp, "clamd"),
            limits={"StreamMaxLength": "2000M", "MaxFileSize": "2000M", "MaxScanSize": "2000M"},
            # Debian's MaxThreads; a queue long enough that no column meets
            # EAGAIN at 50 sessions (the rig's tests exercise that).
            # DisableCache: clamd skips files whose MD5 it has seen clean;
            # a bench that repeats its payloads would measure the cache.
            extra={"MaxThreads": "12", "MaxConnectionQueueLength": "100",
                   "LogVerbose": "no", "DisableCache": "yes"}).start()
        self.stack.callback(self.clamd.stop)
        log("clamd pid %d %s" % (self.clamd.pid, self.clamd.unix_path))

        self.sink_port = act.free_port()
        sink = Proc([VPY, os.path.join(HERE, "sink.py"), str(self.sink_port)],
                    os.path.join(self.tmp, "sink.log"), self.sink_port)
        self.stack.callback(sink.stop)
        self.targets["sink"] = ("127.0.0.1", self.sink_port)
        self.res["columns"]["sink"] = "ok: asyncio sink, pid %d" % sink.p.pid
        self.acct = Account(self.sink_port, self.tmp)

        self.ftp_home = os.path.join(self.tmp, "ftphome")
        os.makedirs(self.ftp_home)
        self.ftp_port = act.free_port()
        ftpd = Proc([VPY, os.path.join(HERE, "ftpserver.py"), str(self.ftp_port), self.ftp_home],
                    os.path.join(self.tmp, "ftpserver.log"), self.ftp_port)
        self.stack.callback(ftpd.stop)

        # The floor: a Python program that only greets, spawned the same way.
        floor = self.stack.enter_context(act.activated([VPY, os.path.join(HERE, "floor.py")]))
        self.floor = floor
        # A warm parent that forks per connection: what a pre-forking
        # design would pay (informational, not a target).
        port = act.free_port()
        ff = Proc([VPY, os.path.join(HERE, "forkfloor.py"), str(port)],
                  os.path.join(self.tmp, "forkfloor.log"), port)
        self.stack.callback(ff.stop)
        self.forkfloor = ("127.0.0.1", port)

        self.setup_peers()
        self.setup_virusgw()

    def setup_peers(self):
        if self.args.no_peers:
            for p in ("clamsmtp", "amavis"):
                self.res["columns"][p] = "not run: --no-peers"
            return
        status = peers.ensure_installed(log)
        for cls, pkg in ((peers.ClamSMTP, "clamsmtp"), (peers.Amavis, "amavisd-new")):
            name = cls.name
            if status[pkg]:
                self.res["columns"][name] = "not run: " + status[pkg]
                log("%s: %s" % (name, status[pkg]))
                continue
            port = act.free_port()
            try:
                peer = cls(self.tmp, port, self.sink_port, self.clamd.unix_path).start()
            except (RuntimeError, OSError, KeyError) as e:
                self.res["columns"][name] = "not run: %s" % e
                log("%s could not start: %s" % (name, e))
                continue
            self.stack.callback(peer.stop)
            self.targets[name] = ("127.0.0.1", port)
            self.res["columns"][name] = "ok: pid %d, %s" % (peer.proc.pid, peer.conf)
            log("%s listening on %d" % (name, port))

    def setup_virusgw(self):
        self.vdir = os.path.join(self.tmp, "virusgw")
        os.makedirs(self.vdir)
        self.pasv = 41000 + (os.getpid() % 40) * 200
        self.vconf = vgw_config(self.vdir, self.clamd, self.sink_port, self.ftp_port, self.pasv)
        # The validated-config cache, as `virusgw setup` makes it in
        # /var/cache/virusgw on a real installation (private here).
        cache = os.path.join(self.vdir, "cache")
        os.makedirs(cache, mode=0o700)
        # systemd-socket-activate hands its children only PATH, HOME, TERM
        # and what -E names (activated(env=...) does not reach them).
        self.env_flags = ["-E", "VIRUSGW_CACHE_DIR=" + cache]
        for name, key, mod in (("virusgw-smtpproxy", "virusgw", "smtpproxy"),
                               ("virusgw-ftpproxy", "virusgw-ftp", "ftpproxy")):
            if not os.path.exists(os.path.join(REPO, mod, "main.py")):
                self.res["columns"][key] = "not run: %s/main.py does not exist yet" % mod
                log(self.res["columns"][key])
                continue
            # The launcher's stderr (which the proxies' children inherit
            # until they point fd 2 at /dev/null) goes to a file: whatever
            # dies before logging is set up lands there.
            err = self.stack.enter_context(open(os.path.join(self.vdir, name + ".stderr"), "ab"))
            hp = self.stack.enter_context(act.activated(self.env_flags +
                                                        act.proxy_argv(name, self.vconf),
                                                        stderr=err))
            ok = proxy_ready(*hp)
            if ok is not True:
                self.res["columns"][key] = "not run: %s %s" % (name, ok)
                log(self.res["columns"][key])
                continue
            self.res["columns"][key] = "ok: %s under systemd-socket-activate" % name
            if key == "virusgw":
                self.targets["virusgw"] = hp
                self.setup_prefork(err)
            else:
                self.ftp_proxy = hp

    def setup_prefork(self, err):
        """virusgw-prefork: the same launcher (from bin/) in its warm forking
        mode, under systemd-socket-activate WITHOUT --inetd (the listening
        socket as fd 3, started once: a .socket with Accept=no)."""
        port = act.free_port()
        argv = [act.ACTIVATE, "-l", "127.0.0.1:%d" % port] + self.env_flags + [
            "-E", "PATH=" + os.path.dirname(VPY) + os.pathsep + os.environ.get("PATH", ""),
            VPY, os.path.join(REPO, "bin", "virusgw-smtpproxy"), "-c", self.vconf]
        try:
            p = Proc(argv, os.path.join(self.vdir, "virusgw-prefork.stderr"), port)
        except RuntimeError as e:
            self.res["columns"]["virusgw-prefork"] = "not run: %s" % e
            return
        self.stack.callback(p.stop)
        ok = proxy_ready("127.0.0.1", port)
        if ok is not True:
            self.res["columns"]["virusgw-prefork"] = "not run: %s" % ok
            return
        self.targets["virusgw-prefork"] = ("127.0.0.1", port)
        self.res["columns"]["virusgw-prefork"] = (
            "ok: bin/virusgw-smtpproxy forking per connection (scanlib/prefork.py), pid %d"
            % p.p.pid)

    def columns(self):
        return [c for c in SMTP_COLUMNS if c in self.targets]

    def order(self, r):
        cols = self.columns()
        k = r % len(cols)
        return cols[k:] + cols[:k]

    # -- sections --------------------------------------------------------------
    def section_greet(self):
        log("greeting: connect to the first line of the greeting")
        n = 10 if self.quick else 30
        who = dict(self.targets)
        who["floor"] = self.floor
        who["fork-floor"] = self.forkfloor
        if self.ftp_proxy:
            who["virusgw-ftp"] = self.ftp_proxy
        names = list(who)
        per = {k: [] for k in names}
        ratios = {"virusgw": [], "virusgw-ftp": [], "virusgw-prefork": []}
        for r in range(self.rounds):
            got = {}
            for k in names[r % len(names):] + names[:r % len(names)]:
                try:
                    got[k] = median(load.greeting_times(*who[k], n)) * 1000
                except (OSError, load.LoadError) as e:
                    got[k] = None
                    self.res["notes"].append("greeting %s: %s" % (k, e))
                per[k].append(got[k])
            for k in ratios:
                if got.get(k) and got.get("floor"):
                    ratios[k].append(got[k] / got["floor"])
        self.res["rows"]["greeting_ms"] = {k: stats(v) for k, v in per.items()}
        for k, label in (("virusgw", "SMTP"), ("virusgw-ftp", "FTP"),
                         ("virusgw-prefork", "SMTP prefork")):
            self.target("greeting %s <= 1.5x the Python floor" % label,
                        median(ratios[k]), 1.5, "x floor", lower=True)

    def section_smtp(self):
        for key, clients in (("seq", 1), ("par20", 20)):
            log("%d small mails, one per connection, %d client(s)" % (self.n_small, clients))
            per = {c: [] for c in self.columns()}
            ratios, ratios_pf = [], []
            detail = {c: [] for c in self.columns()}
            for r in range(self.rounds):
                got = {}
                for c in self.order(r):
                    res = mail_load(self.targets[c], self.acct, "%s-%s-%d" % (key, c, r),
                                    self.n_small, clients)
                    got[c] = res["rate"]
                    per[c].append(res["rate"])
                    detail[c].append({k: res[k] for k in ("wall", "busy", "arrived", "lost",
                                                          "altered", "errors")})
                    log("  round %d %-8s %s msg/s %s" % (
                        r, c, "%.1f" % res["rate"] if res["rate"] else "-",
                        ("lost %d altered %d errors %s" % (res["lost"], res["altered"],
                                                           res["errors"][:1]))
                        if res["lost"] or res["altered"] or res["errors"] else ""))
                best_peer = max([got[p] for p in ("clamsmtp", "amavis") if got.get(p)] or [0])
                if got.get("virusgw") and best_peer:
                    ratios.append(got["virusgw"] / best_peer)
                if got.get("virusgw-prefork") and best_peer:
                    ratios_pf.append(got["virusgw-prefork"] / best_peer)
            self.res["rows"][key + "_msgs_per_s"] = {c: stats(v) for c, v in per.items()}
            self.res["rows"][key + "_detail"] = detail
            self.target("%d mails one per connection, %s: faster than the fastest peer" % (
                self.n_small, "sequential" if clients == 1 else "20 clients"),
                median(ratios), 1.0, "x fastest peer", lower=False, strict=True)
            if "virusgw-prefork" in self.targets:
                self.target("%d mails one per connection, %s, prefork mode: faster than the "
                            "fastest peer" % (self.n_small,
                                              "sequential" if clients == 1 else "20 clients"),
                            median(ratios_pf), 1.0, "x fastest peer", lower=False, strict=True)

    def section_big(self):
        log("one 10 MiB mail with a base64 attachment")
        size = 10 * MiB
        content, parts = load.attachment_mail("big-scan", size)
        paths = {}
        for name, data in (("message", content), ("attachment", parts["attachment"]),
                           ("text", parts["text"])):
            paths[name] = os.path.join(self.tmp, "big-%s.bin" % name)
            with open(paths[name], "wb") as f:
                f.write(data)
        del content, parts
        per = {c: [] for c in self.columns()}
        scans = []
        r_base, r_clamsmtp = [], []
        for r in range(self.rounds):
            got = {}
            for c in self.order(r):
                token = "big-%s-%d" % (c, r)
                content, _ = load.attachment_mail(token, size)
                data = load.stuff(content)
                self.acct.start()
                t0 = time.perf_counter()
                res = load.run_mail_load(self.targets[c][0], self.targets[c][1], [[data]], 1)
                wall = time.perf_counter() - t0
                acc = self.acct.check({token: load.body_sha(content)})
                ok = not res["errors"] and not acc["lost"] and not acc["altered"]
                got[c] = wall * 1000 if ok else None
                if not ok:
                    self.res["notes"].append("10 MiB mail via %s round %d: %s %s" % (
                        c, r, res["errors"][:1], acc))
                per[c].append(got[c])
            # The scans the design requires, one after another: the whole
            # message, then each decoded portion (FILDES, the cheapest way).
            t = sum(load.clamd_fildes(self.clamd.unix_path, paths[k])[0]
                    for k in ("message", "attachment", "text")) * 1000
            scans.append(t)
            if got.get("virusgw") and got.get("sink"):
                r_base.append(got["virusgw"] / (got["sink"] + t))
            if got.get("virusgw") and got.get("clamsmtp"):
                r_clamsmtp.append(got["virusgw"] / got["clamsmtp"])
            log("  round %d %s; scans %.0f ms" % (r, ", ".join(
                "%s %s" % (c, "%.0f ms" % got[c] if got.get(c) else "-") for c in got), t))
        row = {c: stats(v) for c, v in per.items()}
        row["scans_alone"] = stats(scans)
        row["sink+scans"] = stats([s + b for s, b in zip(per.get("sink", []), scans)
                                   if s is not None])
        self.res["rows"]["big10_ms"] = row
        self.target("10 MiB mail faster than ClamSMTP", median(r_clamsmtp), 1.0,
                    "x clamsmtp", lower=True, strict=True)
        self.target("10 MiB mail <= 1.1x (sink + scans)", median(r_base), 1.1,
                    "x (sink+scans)", lower=True)
        for p in paths.values():
            os.unlink(p)

    def section_sessions(self):
        sessions, per = (10, 5) if self.quick else (50, 20)
        log("%d concurrent sessions x %d mails" % (sessions, per))
        row = {}
        for c in self.order(0):
            res = mail_load(self.targets[c], self.acct, "sess-%s" % c, sessions * per,
                            sessions, per_conn=per, timeout=60.0)
            row[c] = {k: res[k] for k in ("wall", "rate", "expected", "arrived", "lost",
                                          "altered", "errors")}
            log("  %-8s %s msg/s, %d/%d arrived, lost %d, altered %d, errors %d" % (
                c, "%.1f" % res["rate"] if res["rate"] else "-", res["arrived"],
                res["expected"], res["lost"], res["altered"], len(res["errors"])))
        self.res["rows"]["sessions"] = row
        if "virusgw" in row:
            v = row["virusgw"]
            ok = not v["errors"] and not v["lost"] and not v["altered"]
            self.res["targets"].append({
                "name": "%d concurrent sessions x %d: no error, nothing lost" % (sessions, per),
                "value": "%d/%d arrived, %d errors" % (v["arrived"], v["expected"],
                                                       len(v["errors"])),
                "result": "PASS" if ok else "MISS"})

    def section_ftp(self):
        if not self.ftp_proxy:
            self.res["notes"].append("FTP: virusgw-ftpproxy not running: %s"
                                     % self.res["columns"].get("virusgw-ftp"))
            return
        size = (64 if self.quick else 200) * MiB
        rounds = 1 if self.quick else 3
        log("FTP: %d MiB up and down, straight and through virusgw-ftpproxy" % (size // MiB))
        src = os.path.join(self.tmp, "ftp-big.src")
        write_pattern(src, size, seed=3)
        want = sha_file(src)
        straight = ("127.0.0.1", self.ftp_port)
        rows = {k: [] for k in ("up_straight", "up_virusgw", "down_straight", "down_virusgw",
                                "scan")}
        r_up, r_down, problems = [], [], []
        dest = os.path.join(self.tmp, "ftp-big.dst")
        for r in range(rounds):
            t = {}
            for leg in (("straight", "virusgw") if r % 2 == 0 else ("virusgw", "straight")):
                hp = straight if leg == "straight" else self.ftp_proxy
                name = "big-%s-%d.bin" % (leg, r)
                try:
                    t["up_" + leg] = load.ftp_upload(hp[0], hp[1], src, name)
                    stored = os.path.join(self.ftp_home, name)
                    if sha_file(stored) != want:
                        problems.append("%s upload round %d: stored bytes differ" % (leg, r))
                    t["down_" + leg], got = load.ftp_download(hp[0], hp[1], name, dest)
                    if got != want:
                        problems.append("%s download round %d: bytes differ" % (leg, r))
                    os.unlink(stored)
                except Exception as e:          # one failed leg must not end the bench
                    problems.append("%s round %d: %s: %s" % (leg, r, type(e).__name__, e))
            t["scan"] = load.clamd_fildes(self.clamd.unix_path, src)[0]
            for k, v in t.items():
                rows[k].append(v * 1000)
            if "up_virusgw" in t and "up_straight" in t:
                r_up.append(t["up_virusgw"] / (t["up_straight"] + t["scan"]))
            if "down_virusgw" in t and "down_straight" in t:
                r_down.append(t["down_virusgw"] / (t["down_straight"] + t["scan"]))
            log("  round %d: %s" % (r, ", ".join("%s %.0f ms" % (k, v * 1000)
                                                 for k, v in t.items())))
        for p in (src, dest):
            if os.path.exists(p):
                os.unlink(p)
        row = {k: stats(v) for k, v in rows.items()}
        row["size_mib"] = size // MiB
        row["problems"] = problems
        self.res["rows"]["ftp_big_ms"] = row
        self.target("FTP %d MiB upload <= 1.2x (straight + one scan)" % (size // MiB),
                    median(r_up) if not problems else None, 1.2, "x", lower=True)
        self.target("FTP %d MiB download <= 1.2x (straight + one scan)" % (size // MiB),
                    median(r_down) if not problems else None, 1.2, "x", lower=True)

        log("FTP: 20 concurrent sessions, each uploads and downloads its own file")
        n, fsize = 20, (256 if self.quick else 1024) * 1024
        cdir = os.path.join(self.tmp, "ftpconc")
        os.makedirs(cdir, exist_ok=True)
        row = {}
        for leg, hp in (("straight", straight), ("virusgw", self.ftp_proxy)):
            files = [("c-%s-%d.bin" % (leg, i), load.pattern_bytes(fsize, seed=100 + i)[i:] +
                      b"%d" % i) for i in range(n)]
            res = load.ftp_concurrent(hp[0], hp[1], files, cdir)
            stored_ok = sum(1 for name, data in files
                            if os.path.exists(os.path.join(self.ftp_home, name))
                            and sha_file(os.path.join(self.ftp_home, name))
                            == hashlib.sha256(data).hexdigest())
            res["stored_identical"] = stored_ok
            res["errors"] = res["errors"][:5]
            row[leg] = res
            log("  %-8s %.2f s, %d/%d stored identical, errors %s" % (
                leg, res["wall"], stored_ok, n, res["errors"][:1]))
        self.res["rows"]["ftp_20_sessions"] = row
        v = row["virusgw"]
        self.res["targets"].append({
            "name": "FTP 20 concurrent sessions, every file byte-identical",
            "value": "%d/%d identical, %d errors" % (v["stored_identical"], n, len(v["errors"])),
            "result": "PASS" if v["stored_identical"] == n and not v["errors"] else "MISS"})
        shutil.rmtree(cdir, ignore_errors=True)

    def section_memory(self):
        row = {}
        if "virusgw" in self.targets:
            big = 20 if self.quick else 100
            log("memory: peak RSS of one smtpproxy process, 1 KB and %d MB mails" % big)
            for label, size in (("1KB", 1000), ("%dMB" % big, big * 1000 * 1000)):
                try:
                    row["smtp_" + label] = smtp_peak_rss(self.targets["virusgw"], size)
                except Exception as e:
                    row["smtp_" + label] = None
                    self.res["notes"].append("RSS smtp %s: %s: %s" % (label, type(e).__name__, e))
            self.rss_target("SMTP", row, "smtp_1KB", "smtp_%dMB" % big)
        if self.ftp_proxy:
            big = 128 if self.quick else 1024
            log("memory: peak RSS of one ftpproxy process, 1 KB and %d MiB files" % big)
            for label, size in (("1KB", 1000), ("%dMiB" % big, big * MiB)):
                try:
                    row["ftp_" + label] = ftp_peak_rss(self.ftp_proxy, size, self.tmp,
                                                       self.ftp_home)
                except Exception as e:
                    row["ftp_" + label] = None
                    self.res["notes"].append("RSS ftp %s: %s: %s" % (label, type(e).__name__, e))
            self.rss_target("FTP", row, "ftp_1KB", "ftp_%dMiB" % big)
        self.res["rows"]["peak_rss_mb"] = row

    def rss_target(self, proto, row, small, large):
        s, l = row.get(small), row.get(large)
        value = None if s is None or l is None else "%.1f MB -> %.1f MB" % (s, l)
        ok = s is not None and l is not None and l < 40 and l - s < 5
        self.res["targets"].append({
            "name": "%s peak RSS flat (%s vs %s: growth < 5 MB) and < 40 MB" % (proto, small,
                                                                                large),
            "value": value, "result": "n/a" if value is None else ("PASS" if ok else "MISS")})

    def section_profile(self):
        if "virusgw" not in self.targets:
            return
        import profile_vgw
        log("profile: per-step times, -X importtime, cProfile, pyinstrument")
        self.res["profile"] = profile_vgw.run(self)

    def section_extras(self):
        """The benchmarks others wrote beside this one (by hand, or with
        --extras): their own output, kept in the JSON."""
        runs = [("scan_big", ["--size-mib", "256" if self.quick else "1024"]),
                ("quarantine_list", ["--entries", "5000" if self.quick else "100000",
                                     "--rounds", "1" if self.quick else "3"])]
        out = {}
        for name, extra in runs:
            path = os.path.join(HERE, name + ".py")
            if not os.path.exists(path):
                continue
            log("extra: %s %s" % (name, " ".join(extra)))
            try:
                r = subprocess.run([VPY, path] + extra, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=900)
                text = r.stdout.decode("utf-8", "replace").strip().splitlines()
                out[name] = {"exit": r.returncode, "output": text[-40:]}
            except subprocess.TimeoutExpired:
                out[name] = {"exit": None, "output": ["timed out after 900 s"]}
        self.res["extras"] = out

    # -- bookkeeping -----------------------------------------------------------
    def target(self, name, value, limit, unit, lower=True, strict=False):
        if value is None:
            result = "n/a"
        elif lower:
            result = "PASS" if (value < limit if strict else value <= limit) else "MISS"
        else:
            result = "PASS" if (value > limit if strict else value >= limit) else "MISS"
        self.res["targets"].append({"name": name, "value": value, "limit": limit,
                                    "unit": unit, "result": result})

    def run(self):
        sections = ["greet", "smtp", "big", "sessions", "ftp", "memory", "profile"]
        if self.args.only:
            sections = [s for s in sections if s in self.args.only.split(",")]
        if self.args.no_profile and "profile" in sections:
            sections.remove("profile")
        if self.args.extras:
            sections.append("extras")
        t0 = time.monotonic()
        with self.stack:
            self.setup()
            for s in sections:
                if s in ("smtp", "big", "sessions") and "virusgw" not in self.targets:
                    self.res["notes"].append("%s: virusgw-smtpproxy not running (%s); peers "
                                             "measured alone" % (s, self.res["columns"].get(
                                                 "virusgw")))
                t = time.monotonic()
                try:
                    getattr(self, "section_" + s)()
                except Exception as e:        # a broken section must not lose the others
                    import traceback
                    self.res["notes"].append("section %s failed: %s" % (
                        s, traceback.format_exc().strip().splitlines()[-1]))
                    log("section %s failed:\n%s" % (s, traceback.format_exc()))
                self.res["meta"]["section_%s_s" % s] = round(time.monotonic() - t, 1)
        self.res["meta"]["total_s"] = round(time.monotonic() - t0, 1)
        return self.res


def write_pattern(path, size, seed=7):
    block = load.pattern_bytes(MiB, seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= len(block)


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def vmhwm_mb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


def _only_pid(sock):
    pids = act.wait_until(lambda: procs.server_pids(sock), timeout=10, what="the proxy's pid")
    return pids[0]


def smtp_peak_rss(target, size):
    """Peak RSS (VmHWM) of the proxy process that carried one mail of about
    size bytes, read before QUIT while the process is still there."""
    content, _ = (load.attachment_mail("rss", size) if size > 100000
                  else (load.small_mail("rss"), None))
    data = load.stuff(content)
    del content
    s = socket.create_connection(target, timeout=600)
    try:
        f = s.makefile("rb")

        def reply(want):
            while True:
                line = f.readline()
                if not line:
                    raise load.LoadError("closed")
                if line[3:4] != b"-":
                    if line[:1] != want:
                        raise load.LoadError(line.decode("latin-1").strip())
                    return
        reply(b"2")
        pid = _only_pid(s)
        s.sendall(b"EHLO rss.bench.test\r\n")
        reply(b"2")
        s.sendall(b"MAIL FROM:<sender@bench.test>\r\n")
        reply(b"2")
        s.sendall(b"RCPT TO:<rcpt@bench.test>\r\n")
        reply(b"2")
        s.sendall(b"DATA\r\n")
        reply(b"3")
        s.sendall(data)
        reply(b"2")
        peak = vmhwm_mb(pid)
        s.sendall(b"QUIT\r\n")
        return peak
    finally:
        s.close()


def ftp_peak_rss(target, size, tmp, home):
    src = os.path.join(tmp, "rss.src")
    write_pattern(src, size, seed=5)
    ftp = load.ftp_connect(target[0], target[1], timeout=900)
    try:
        pid = _only_pid(ftp.sock)
        with open(src, "rb") as f:
            ftp.storbinary("STOR rss.bin", f, blocksize=1 << 16)
        ftp.retrbinary("RETR rss.bin", lambda b: None, blocksize=1 << 16)
        return vmhwm_mb(pid)
    finally:
        load._quit(ftp)
        for p in (src, os.path.join(home, "rss.bin")):
            if os.path.exists(p):
                os.unlink(p)


# -- output --------------------------------------------------------------------

def fmt(st, unit=""):
    if not st:
        return "-"
    m = st["median"]
    v = ("%.0f" % m) if m >= 100 else ("%.1f" % m) if m >= 10 else ("%.2f" % m)
    return "%s%s ±%.0f%%" % (v, unit, st["spread_pct"])


def table(res):
    rows = res["rows"]
    cols = ["virusgw", "virusgw-prefork", "clamsmtp", "amavis", "sink"]
    head = ["load", "virusgw", "virusgw prefork", "ClamSMTP", "amavisd-new",
            "straight to the sink"]
    out = []

    def add(label, row, unit="", extra=None):
        if not row:
            return
        cells = [fmt(row.get(c), unit) for c in cols]
        if extra:
            cells[-1] = cells[-1] + "; " + extra
        out.append([label] + cells)

    g = rows.get("greeting_ms")
    if g:
        add("connect to greeting (ms)", g, extra="floor %s; ftpproxy %s; fork floor %s" % (
            fmt(g.get("floor")), fmt(g.get("virusgw-ftp")), fmt(g.get("fork-floor"))))
    n = res["meta"]["small_mails"]
    add("%d small mails, one per connection, sequential (msg/s)" % n, rows.get("seq_msgs_per_s"))
    add("%d small mails, one per connection, 20 clients (msg/s)" % n,
        rows.get("par20_msgs_per_s"))
    b = rows.get("big10_ms")
    if b:
        add("one 10 MiB mail (ms)", b, extra="sink+scans %s (scans alone %s)" % (
            fmt(b.get("sink+scans")), fmt(b.get("scans_alone"))))
    s = rows.get("sessions")
    if s:
        out.append(["concurrent sessions x mails (msg/s, arrived/sent)"] + [
            ("%.1f, %d/%d%s" % (s[c]["rate"] or 0, s[c]["arrived"], s[c]["expected"],
                                ", %d err" % len(s[c]["errors"]) if s[c]["errors"] else ""))
            if c in s else "-" for c in cols])
    lines = []
    widths = [max(len(str(r[i])) for r in [head] + out) for i in range(len(head))]
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    for i, r in enumerate([head] + out):
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            lines.append(sep)
    f = rows.get("ftp_big_ms")
    if f:
        lines.append("")
        lines.append("FTP %d MiB (ms): upload virusgw %s vs straight %s + scan %s; "
                     "download virusgw %s vs straight %s + scan%s" % (
                         f["size_mib"], fmt(f.get("up_virusgw")), fmt(f.get("up_straight")),
                         fmt(f.get("scan")), fmt(f.get("down_virusgw")),
                         fmt(f.get("down_straight")),
                         ("; PROBLEMS: %s" % f["problems"]) if f["problems"] else ""))
    c = rows.get("ftp_20_sessions")
    if c:
        lines.append("FTP 20 concurrent sessions: " + "; ".join(
            "%s %.2f s, %d/%d identical, %d errors" % (k, v["wall"], v["stored_identical"],
                                                       v["sessions"], len(v["errors"]))
            for k, v in c.items()))
    m = rows.get("peak_rss_mb")
    if m:
        lines.append("peak RSS of one proxy process (MB): " + ", ".join(
            "%s %s" % (k, "%.1f" % v if v is not None else "-") for k, v in m.items()))
    lines.append("")
    lines.append("targets:")
    for t in res["targets"]:
        v = t.get("value")
        if isinstance(v, float):
            v = "%.2f%s (limit %s)" % (v, t.get("unit", ""), t.get("limit"))
        lines.append("  %-4s %s: %s" % (t["result"], t["name"], v if v is not None else "-"))
    lines.append("")
    lines.append("columns:")
    for k, v in res["columns"].items():
        lines.append("  %-12s %s" % (k, v))
    if res["notes"]:
        lines.append("")
        lines.append("notes:")
        lines.extend("  " + n for n in res["notes"])
    for name, e in (res.get("extras") or {}).items():
        lines.append("")
        lines.append("%s (exit %s):" % (name, e["exit"]))
        lines.extend("  " + x for x in e["output"][-15:])
    p = res.get("profile") or {}
    if p.get("summary"):
        lines.append("")
        lines.append("virusgw profile (details in the JSON):")
        lines.extend("  " + x for x in p["summary"])
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds and smaller loads (a few minutes; not for the issue)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per interleaved load")
    ap.add_argument("--only", default="", help="comma-separated sections")
    ap.add_argument("--no-peers", action="store_true", help="skip clamsmtp and amavis")
    ap.add_argument("--no-profile", action="store_true", help="skip the profile section")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    ap.add_argument("--extras", action="store_true",
                    help="also run scan_big.py and quarantine_list.py (several minutes more)")
    ap.add_argument("--json", default=os.path.join(HERE, "results.json"))
    args = ap.parse_args(argv)
    if not shutil.which("systemd-socket-activate") and not os.path.exists(act.ACTIVATE):
        print("systemd-socket-activate is missing (apt-get install systemd)", file=sys.stderr)
        return 1
    bench = Bench(args)
    try:
        res = bench.run()
    except Exception as e:
        log("the bench could not run: %s: %s" % (type(e).__name__, e))
        raise
    res["meta"]["finished"] = datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z"
    with open(args.json + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.rename(args.json + ".tmp", args.json)
    print()
    print(table(res))
    print("\nJSON: %s; total %.0f s" % (args.json, res["meta"]["total_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
