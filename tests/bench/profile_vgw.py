"""Where virusgw's time goes, per connection and per message.

Four views, each of the real proxies under systemd-socket-activate with the
bench's config, clamd, sink and FTP server:
  steps        the client's wall time per SMTP step (greeting = process
               start + imports + config; dot = spool + scan + relay + reply)
  importtime   -X importtime of each proxy's whole start path, one session
  cprofile     cProfile of N one-message connections, aggregated
  pyinstrument the same with pyinstrument (installed into the venv here,
               from PyPI, when missing), sessions combined
The proxies are not changed: profdriver.py wraps their main().
"""

import glob
import io
import os
import pstats
import subprocess
import sys

import load
from tests.rig import activate as act
from tests.rig import procs

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "profdriver.py")


def _argv(bench, mode, outdir, module, launcher, pyflags=()):
    return (bench.env_flags + [bench_python(), *pyflags, DRIVER, mode, outdir, module, "--",
             os.path.join(act.VENV_BIN, launcher), "-c", bench.vconf])


def bench_python():
    return os.path.join(act.VENV_BIN, "python")


def smtp_traffic(hp, n, prefix):
    batches = [[load.stuff(load.small_mail("%s-%d" % (prefix, i)))] for i in range(n)]
    return load.run_mail_load(hp[0], hp[1], batches, 1, timeout=30)


def big_traffic(hp, n):
    """n 10 MiB mails (base64 attachment, distinct payloads), one per
    connection: where a big message's time goes."""
    for i in range(n):
        content, _ = load.attachment_mail("prof-big-%d" % i, 10 << 20)
        load.run_mail_load(hp[0], hp[1], [[load.stuff(content)]], 1, timeout=120)
    return n


def ftp_one_session(hp, tmp):
    """One control connection: upload and download a small file."""
    src = os.path.join(tmp, "prof-ftp1.src")
    with open(src, "wb") as f:
        f.write(load.pattern_bytes(64 * 1024, seed=8))
    ftp = load.ftp_connect(hp[0], hp[1], timeout=30)
    try:
        with open(src, "rb") as f:
            ftp.storbinary("STOR prof-one.bin", f)
        ftp.retrbinary("RETR prof-one.bin", lambda b: None)
    finally:
        load._quit(ftp)
    return 1


def ftp_traffic(hp, tmp, n):
    src = os.path.join(tmp, "prof-ftp.src")
    with open(src, "wb") as f:
        f.write(load.pattern_bytes(64 * 1024, seed=9))
    for i in range(n):
        load.ftp_upload(hp[0], hp[1], src, "prof-%d.bin" % i)
        load.ftp_download(hp[0], hp[1], "prof-%d.bin" % i, src + ".back")
    return 2 * n


def steps(bench, n):
    st = {}
    batches = [[load.stuff(load.small_mail("steps-%d" % i))] for i in range(n)]
    r = load.run_mail_load(*bench.targets["virusgw"], batches, 1, timeout=30, steps=st)
    ok = n - len(r["errors"])
    per = {k: round(1000 * v / max(ok, 1), 2) for k, v in st.items()}
    per["total"] = round(sum(per.values()), 2)
    sink = {}
    load.run_mail_load(*bench.targets["sink"], batches, 1, timeout=30, steps=sink)
    return {"virusgw_ms_per_message": per,
            "sink_ms_per_message": {k: round(1000 * v / n, 3) for k, v in sink.items()},
            "errors": r["errors"][:3]}


def parse_importtime(text, top=15):
    """Lines 'import time: SELF | CUMULATIVE | <indent>name' (microseconds,
    two spaces of indent per nesting level)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        parts = line[len("import time:"):].split("|", 2)
        if len(parts) != 3:
            continue
        try:
            self_us, cum_us = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        name = parts[2]
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((self_us, cum_us, depth, name.strip()))
    total = sum(r[0] for r in rows)
    first = [r for r in rows if r[2] == 0]
    return {"total_ms": round(total / 1000, 1), "modules": len(rows),
            "top_level_by_cumulative_ms": [
                (n, round(c / 1000, 2)) for _s, c, _d, n in sorted(first, key=lambda r: -r[1])[:top]],
            "by_self_ms": [
                (n, round(s / 1000, 2)) for s, _c, _d, n in sorted(rows, key=lambda r: -r[0])[:top]]}


def importtime(bench, module, launcher, traffic):
    out = os.path.join(bench.tmp, "importtime-%s.txt" % module)
    with open(out, "wb") as err:
        with act.activated(_argv(bench, "importtime", bench.tmp, module + ".main", launcher,
                                 ("-X", "importtime")), stderr=err) as hp:
            traffic(hp)
            _settle(bench.tmp, "")
    with open(out, encoding="utf-8", errors="replace") as f:
        return parse_importtime(f.read())


def cprofile(bench, module, launcher, traffic, top=25, label=None):
    d = os.path.join(bench.tmp, "cprofile-" + (label or module))
    os.makedirs(d, exist_ok=True)
    with act.activated(_argv(bench, "cprofile", d, module + ".main", launcher)) as hp:
        count = traffic(hp)
        _settle(d, "*.prof")
    files = [f for f in sorted(glob.glob(os.path.join(d, "*.prof"))) if _loads(f)]
    if not files:
        return {"error": "no profile written (the proxy left through os._exit?)"}
    out = {"processes": len(files), "units": count}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        st = pstats.Stats(*files, stream=buf)
        st.sort_stats(key).print_stats(top)
        out[key] = _trim(buf.getvalue())
    total = pstats.Stats(*files).total_tt
    out["total_ms_per_process"] = round(1000 * total / len(files), 2)
    return out


def _settle(d, pattern, timeout=10.0):
    """Wait until the per-connection processes have written their profiles
    (the client is done before the last proxy has exited): the count of
    files stops changing and none of the driver's processes is left."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in procs.matching(d) if b"socket-activate" not in _cmdline(p)]
        if not left:
            return
        time.sleep(0.05)


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _loads(path):
    try:
        pstats.Stats(path)
        return True
    except Exception:
        return False


def _trim(text):
    lines = [l.rstrip() for l in text.splitlines() if l.strip()]
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return [lines[i] for i in range(max(0, start - 2), len(lines))]


def ensure_pyinstrument():
    try:
        import pyinstrument  # noqa: F401
        return None
    except ImportError:
        pass
    r = subprocess.run([bench_python(), "-m", "pip", "install", "-q", "pyinstrument"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode:
        return "pip install pyinstrument failed: %s" % r.stdout.decode()[-300:]
    import importlib
    importlib.invalidate_caches()
    return None


def pyinstrument(bench, module, launcher, traffic):
    problem = ensure_pyinstrument()
    if problem:
        return {"error": problem}
    from pyinstrument.session import Session
    from pyinstrument.renderers import ConsoleRenderer
    d = os.path.join(bench.tmp, "pyinstrument-" + module)
    os.makedirs(d, exist_ok=True)
    with act.activated(_argv(bench, "pyinstrument", d, module + ".main", launcher)) as hp:
        traffic(hp)
        _settle(d, "*.pyisession")
    files = sorted(glob.glob(os.path.join(d, "*.pyisession")))
    if not files:
        return {"error": "no session written"}
    session = Session.load(files[0])
    for f in files[1:]:
        session = Session.combine(session, Session.load(f))
    text = ConsoleRenderer(unicode=False, color=False, show_all=False).render(session)
    return {"processes": len(files), "tree": [l.rstrip() for l in text.splitlines()
                                              if l.strip()][:120]}


def run(bench):
    quick = bench.quick
    n = 10 if quick else 30
    res = {"summary": []}

    def safe(name, fn, *a):
        try:
            res[name] = fn(*a)
        except Exception as e:          # a profile view that fails must not end the bench
            res[name] = {"error": "%s: %s" % (type(e).__name__, e)}

    safe("steps", steps, bench, n)
    smtp = lambda hp: smtp_traffic(hp, 1, "imp")           # noqa: E731
    safe("importtime_smtp", importtime, bench, "smtpproxy", "virusgw-smtpproxy", smtp)
    safe("cprofile_smtp", cprofile, bench, "smtpproxy", "virusgw-smtpproxy",
         lambda hp: smtp_traffic(hp, n, "cprof") and n)
    safe("pyinstrument_smtp", pyinstrument, bench, "smtpproxy", "virusgw-smtpproxy",
         lambda hp: smtp_traffic(hp, n, "pyi") and n)
    safe("cprofile_smtp_10mib", cprofile, bench, "smtpproxy", "virusgw-smtpproxy",
         lambda hp: big_traffic(hp, 2), 30, "smtpproxy-10mib")
    if bench.ftp_proxy:
        ftp = lambda hp: ftp_one_session(hp, bench.tmp)       # noqa: E731
        safe("importtime_ftp", importtime, bench, "ftpproxy", "virusgw-ftpproxy", ftp)
        safe("cprofile_ftp", cprofile, bench, "ftpproxy", "virusgw-ftpproxy",
             lambda hp: ftp_traffic(hp, bench.tmp, 3 if quick else 5))
    s = res.get("steps", {}).get("virusgw_ms_per_message")
    if s:
        res["summary"].append("SMTP wall ms per one-message connection: " + ", ".join(
            "%s %.1f" % kv for kv in s.items()))
    for k in ("importtime_smtp", "importtime_ftp"):
        it = res.get(k) or {}
        if "total_ms" in it:
            res["summary"].append("%s: %d modules, %.1f ms; biggest: %s" % (
                k, it["modules"], it["total_ms"], ", ".join(
                    "%s %.1f" % t for t in it["top_level_by_cumulative_ms"][:6])))
    p = res.get("pyinstrument_smtp") or {}
    if p.get("tree"):
        res["summary"].append("pyinstrument_smtp: %d processes combined; tree in the JSON"
                              % p["processes"])
    for k in ("cprofile_smtp", "cprofile_smtp_10mib", "cprofile_ftp"):
        c = res.get(k) or {}
        if "total_ms_per_process" in c:
            res["summary"].append("%s: %.1f ms profiled per process over %d processes" % (
                k, c["total_ms_per_process"], c["processes"]))
    return res
