#!/usr/bin/env python3
"""`make demo`: the whole gateway on loopback, with real clients.

Starts, each as its own process and stopped by its PID at the end:
  - a private clamd with the test signatures (tests/rig/clamd.py), unless
    --clamd ENDPOINT or --config FILE names a clamd that answers PING (a
    system clamd with real signatures);
  - an SMTP sink (aiosmtpd) that writes what it receives to a folder;
  - an FTP server (pyftpdlib, tests/rig/ftp.py);
  - both proxies under systemd-socket-activate --inetd (tests/rig/activate.py),
    one process per connection, as inetd or a systemd .socket would run them.
Then sends a clean and an infected mail with swaks and uploads and downloads
a clean and an infected file with curl, prints what each client saw and
what arrived upstream, lists the quarantine (`virusgw quarantine list`),
checks each outcome, and stops everything.  Exit 0 when every outcome is
as expected, 1 otherwise.

--keep leaves everything running and prints how to connect by hand and how
to stop it (the PIDs, and a stop script in the work folder).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.rig import clamd as clamd_rig            # noqa: E402
from tests.rig import procs                          # noqa: E402
from tests.rig.activate import activated, free_port, proxy_argv, wait_until, write_config  # noqa: E402
from tests.rig.ftp import PyFtpd, USER as FTP_USER, PASSWORD as FTP_PASSWORD  # noqa: E402

VENV_BIN = os.path.join(REPO, ".venv", "bin")
CLEAN_TEXT = b"Quarterly report: nothing to see here, just clean text.\r\n"

# An SMTP sink: every message as NNN.eml plus NNN.json (envelope), in DIR.
_SINK = r'''
import json, os, sys, time, signal
from aiosmtpd.controller import Controller
directory, port = sys.argv[1], int(sys.argv[2])
class Sink:
    n = 0
    async def handle_DATA(self, server, session, envelope):
        Sink.n += 1
        base = os.path.join(directory, "%03d" % Sink.n)
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        with open(base + ".json", "w") as f:
            json.dump({"from": envelope.mail_from, "to": envelope.rcpt_tos,
                       "peer": session.peer[0]}, f)
        return "250 2.0.0 Ok: stored as %03d" % Sink.n
c = Controller(Sink(), hostname="127.0.0.1", port=port, ready_timeout=30)
c.start()
print("READY", flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
c.stop()
'''


class Sink:
    """The aiosmtpd sink as a process of its own (it must outlive us with --keep)."""

    def __init__(self, directory):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.port = None
        self.proc = None

    def start(self):
        for _attempt in range(3):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SINK, self.directory, str(self.port)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                start_new_session=True)
            if self.proc.stdout.readline().startswith(b"READY"):
                self.proc.stdout.close()
                return self
            self.stop()
        raise RuntimeError("the SMTP sink did not start")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()

    def messages(self):
        out = []
        for name in sorted(os.listdir(self.directory)):
            if name.endswith(".json"):
                base = os.path.join(self.directory, name[:-5])
                with open(base + ".json") as f:
                    env = json.load(f)
                with open(base + ".eml", "rb") as f:
                    env["content"] = f.read()
                out.append(env)
        return out


# -- output --------------------------------------------------------------------

def say(text=""):
    print(text, flush=True)


def heading(text):
    say()
    say("== %s " % text + "=" * max(0, 70 - len(text)))


def show_client(lines):
    say("  client saw:")
    for line in lines or ["(nothing)"]:
        say("    " + line)


def _mail_header(content, name):
    from email.parser import BytesHeaderParser
    from email import policy
    msg = BytesHeaderParser(policy=policy.compat32).parsebytes(content)
    return [" ".join(str(v).split()) for v in msg.get_all(name, [])]


# -- clients -------------------------------------------------------------------

def swaks(port, subject, attach=None):
    argv = ["swaks", "--server", "127.0.0.1", "--port", str(port),
            "--from", "alice@example.org", "--to", "bob@example.com",
            "--helo", "client.example.org", "--header", "Subject: %s" % subject,
            "--body", "Hello Bob,\nthe file you asked for.\n", "--timeout", "60"]
    if attach:
        argv += ["--attach", "@" + attach]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    # Server lines are '<-' (ok) and '<**' (error); keep from MAIL on.
    lines, started = [], False
    for line in r.stdout.splitlines():
        if line.startswith(" -> MAIL FROM"):
            started = True
        if started and (line.startswith("<-") or line.startswith("<**")):
            lines.append(line)
        elif started and line.startswith(" -> ") and not line.startswith(" -> ."):
            if line[4:8].isupper() and line[4:].split()[0].isalpha() and len(line) < 80:
                lines.append(line)
    if not lines:
        lines = (r.stdout + r.stderr).strip().splitlines()[-5:]
    return r.returncode, lines


def curl(port, command, remote, local):
    """command 'STOR' uploads local, 'RETR' downloads into local."""
    url = "ftp://127.0.0.1:%d/%s" % (port, remote)
    argv = ["curl", "-sS", "-v", "--max-time", "120", "--user",
            "%s:%s" % (FTP_USER, FTP_PASSWORD)]
    argv += ["-T", local, url] if command == "STOR" else ["-o", local, url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    lines, started = [], False
    for line in r.stderr.splitlines():
        if line.startswith("> %s" % command):
            started = True
            lines.append(line)
        elif started and line.startswith("< "):
            lines.append(line)
        elif line.startswith("curl: ("):
            lines.append(line)
    return r.returncode, lines


# -- the demo ------------------------------------------------------------------

class Demo:
    def __init__(self, keep, clamd_endpoints):
        self.keep = keep
        self.work = tempfile.mkdtemp(prefix="virusgw-demo-")
        os.chmod(self.work, 0o755)
        self.clamd = None
        self.clamd_endpoints = clamd_endpoints
        self.sink = Sink(os.path.join(self.work, "sink"))
        self.ftp_root = os.path.join(self.work, "ftp-root")
        os.makedirs(self.ftp_root)
        self.ftpd = PyFtpd(self.ftp_root)
        self.launchers = []          # context managers of activated()
        self.checks = []

    def check(self, what, ok, detail=""):
        self.checks.append((what, bool(ok), detail))

    def start(self):
        heading("starting (everything on loopback, stopped by PID at the end)")
        say("work folder: %s" % self.work)
        if self.clamd_endpoints:
            say("clamd:       %s (yours, with its own signatures)" % ", ".join(self.clamd_endpoints))
        else:
            self.clamd = clamd_rig.Clamd(os.path.join(self.work, "clamd")).start()
            self.clamd_endpoints = self.clamd.endpoints
            say("clamd:       pid %d, %s (test signatures: EICAR and two made-up ones)"
                % (self.clamd.pid, ", ".join(self.clamd_endpoints)))
        self.sink.start()
        say("SMTP sink:   pid %d, 127.0.0.1:%d (aiosmtpd, writes to %s)"
            % (self.sink.pid, self.sink.port, self.sink.directory))
        self.ftpd.start()
        say("FTP server:  pid %d, 127.0.0.1:%d (pyftpdlib, user %s, files in %s)"
            % (self.ftpd.pid, self.ftpd.port, FTP_USER, self.ftp_root))
        lo = 40000 + (os.getpid() % 200) * 100
        self.conf = write_config(self.work, (
            "[scanner]\nclamd = %s\ntimeout = 60\n"
            "[smtp]\nupstream = smtp:127.0.0.1:%d\nlocal_domains = example.com\naction = reject\n"
            "[ftp]\nupstream = tcp:127.0.0.1:%d\naction = quarantine\npassive_ports = %d-%d\n")
            % (", ".join(self.clamd_endpoints), self.sink.port, self.ftpd.port, lo, lo + 99))
        r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "setup", "-c", self.conf],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
        say("config:      %s (`virusgw setup` made its directories%s)"
            % (self.conf, "" if r.returncode == 0 else ": FAILED " + r.stderr.strip()))
        self.smtp_port = self._proxy("virusgw-smtpproxy")
        self.ftp_port = self._proxy("virusgw-ftpproxy")
        say("SMTP proxy:  127.0.0.1:%d  (systemd-socket-activate -> virusgw-smtpproxy per connection)"
            % self.smtp_port)
        say("FTP proxy:   127.0.0.1:%d  (systemd-socket-activate -> virusgw-ftpproxy per connection)"
            % self.ftp_port)
        say("SMTP: action = reject (a copy kept: keep_blocked); FTP: action = quarantine")

    def _proxy(self, program):
        cm = activated(proxy_argv(program, self.conf))
        host, port = cm.__enter__()
        self.launchers.append(cm)
        return port

    def launcher_pids(self):
        pids = []
        for port in (self.smtp_port, self.ftp_port):
            pids += [p for p in procs.matching(b"systemd-socket-activate")
                     if b"\x00127.0.0.1:%d\x00" % port in _cmdline(p)
                     and self.conf.encode() in _cmdline(p)]
        return pids

    # -- traffic ---------------------------------------------------------------
    def run(self):
        files = os.path.join(self.work, "client")
        os.makedirs(files)
        clean = os.path.join(files, "report.txt")
        with open(clean, "wb") as f:
            f.write(CLEAN_TEXT)
        eicar = os.path.join(files, "eicar.com")
        with open(eicar, "wb") as f:
            f.write(clamd_rig.EICAR)
        # What the FTP server already holds, for the downloads.
        with open(os.path.join(self.ftp_root, "served-clean.txt"), "wb") as f:
            f.write(CLEAN_TEXT)
        with open(os.path.join(self.ftp_root, "served-eicar.com"), "wb") as f:
            f.write(clamd_rig.EICAR)

        heading("1. a clean mail (swaks)")
        rc, lines = swaks(self.smtp_port, "clean mail")
        show_client(lines)
        self.check("clean mail accepted (250)", rc == 0 and any(
            l.startswith("<-  250") and "stored" in l for l in lines))

        heading("2. an infected mail: EICAR attached (swaks --attach)")
        rc, lines = swaks(self.smtp_port, "infected mail", attach=eicar)
        show_client(lines)
        self.check("infected mail refused (554)", rc != 0 and any(
            l.startswith("<** 554") for l in lines))

        heading("3. a clean upload (curl -T)")
        rc, lines = curl(self.ftp_port, "STOR", "uploaded-clean.txt", clean)
        show_client(lines)
        self.check("clean upload stored (226)", rc == 0 and _content(
            os.path.join(self.ftp_root, "uploaded-clean.txt")) == CLEAN_TEXT)

        heading("4. an infected upload (curl -T)")
        rc, lines = curl(self.ftp_port, "STOR", "uploaded-eicar.com", eicar)
        show_client(lines)
        self.check("infected upload refused (55x), not stored", rc != 0 and any(
            l.startswith("< 55") for l in lines) and not os.path.exists(
            os.path.join(self.ftp_root, "uploaded-eicar.com")))

        heading("5. a clean download (curl)")
        got = os.path.join(files, "got-clean.txt")
        rc, lines = curl(self.ftp_port, "RETR", "served-clean.txt", got)
        show_client(lines)
        self.check("clean download received", rc == 0 and _content(got) == CLEAN_TEXT)

        heading("6. an infected download (curl)")
        got = os.path.join(files, "got-eicar.com")
        rc, lines = curl(self.ftp_port, "RETR", "served-eicar.com", got)
        show_client(lines)
        self.check("infected download refused (550), no bytes", rc != 0 and any(
            l.startswith("< 550") for l in lines) and not _content(got))

        heading("what arrived upstream")
        msgs = self.sink.messages()
        say("SMTP sink: %d message(s)" % len(msgs))
        for m in msgs:
            say("  %s -> %s  %s  %d bytes" % (m["from"], ", ".join(m["to"]),
                                             _mail_header(m["content"], "Subject"),
                                             len(m["content"])))
            for name in ("X-Virus-Scanned", "X-Virus-Status"):
                for v in _mail_header(m["content"], name):
                    say("      %s: %s" % (name, v))
        subjects = [_mail_header(m["content"], "Subject") for m in msgs]
        self.check("the sink got the clean mail, and only it",
                   subjects == [["clean mail"]] and clamd_rig.EICAR not in b"".join(
                       m["content"] for m in msgs))
        say("FTP server files:")
        for name in sorted(os.listdir(self.ftp_root)):
            data = _content(os.path.join(self.ftp_root, name))
            say("  %-22s %5d bytes%s" % (name, len(data),
                                        "  (contains EICAR)" if clamd_rig.EICAR in data else ""))

        heading("the quarantine: virusgw quarantine list")
        r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "quarantine", "list",
                            "-c", self.conf], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
        say(r.stdout.rstrip() or "(empty)")
        if r.stderr.strip():
            say(r.stderr.rstrip())
        r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "quarantine", "list", "--json",
                            "-c", self.conf], capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
        entries = [json.loads(l) for l in r.stdout.splitlines() if l.strip()]
        protocols = sorted(e.get("protocol") for e in entries)
        self.check("quarantine holds the blocked mail and both infected files",
                   r.returncode == 0 and protocols == ["ftp", "ftp", "smtp"],
                   "protocols: %s" % protocols)
        mail = [e for e in entries if e.get("protocol") == "smtp"]
        if mail and mail[0].get("id"):
            say()
            say("$ virusgw quarantine show %s" % mail[0]["id"])
            r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "quarantine", "show",
                                "-c", self.conf, mail[0]["id"]], capture_output=True,
                               text=True, timeout=60, env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
            say((r.stdout + r.stderr).rstrip())

        heading("summary")
        for what, ok, detail in self.checks:
            say("  %-58s %s%s" % (what, "ok" if ok else "UNEXPECTED",
                                 "" if ok or not detail else "  (%s)" % detail))
        failed = [c for c in self.checks if not c[1]]
        if failed:
            say()
            say("proxy log (%s), last lines:" % os.path.join(self.work, "virusgw.log"))
            for line in _tail(os.path.join(self.work, "virusgw.log"), 15):
                say("  " + line)
        return 1 if failed else 0

    # -- the end -----------------------------------------------------------------
    def keep_running(self):
        pids = [p for p in [self.clamd.pid if self.clamd else None, self.sink.pid,
                            self.ftpd.pid] + self.launcher_pids() if p]
        stop = os.path.join(self.work, "stop.sh")
        with open(stop, "w") as f:
            f.write("#!/bin/sh\n# stops what `make demo KEEP=1` left running, by PID; a PID\n"
                    "# is signalled only while its command line still names this demo's\n"
                    "# folder (PIDs are reused).\n")
            f.write("for pid in %s; do\n" % " ".join(str(p) for p in pids))
            f.write("  grep -qF '%s' /proc/$pid/cmdline 2>/dev/null && kill $pid\n" % self.work)
            f.write("done\nexit 0\n")
        os.chmod(stop, 0o755)
        heading("left running (--keep)")
        say("SMTP proxy  127.0.0.1:%d   e.g. swaks --server 127.0.0.1:%d --to bob@example.com "
            "--attach @%s" % (self.smtp_port, self.smtp_port,
                              os.path.join(self.work, "client", "eicar.com")))
        say("FTP proxy   127.0.0.1:%d   e.g. curl -T FILE --user %s:%s ftp://127.0.0.1:%d/"
            % (self.ftp_port, FTP_USER, FTP_PASSWORD, self.ftp_port))
        say("            or: lftp -u %s,%s -p %d 127.0.0.1"
            % (FTP_USER, FTP_PASSWORD, self.ftp_port))
        say("mail that arrived:  %s" % self.sink.directory)
        say("FTP server files:   %s" % self.ftp_root)
        say("proxy log:          %s" % os.path.join(self.work, "virusgw.log"))
        say("quarantine:         %s quarantine list -c %s"
            % (os.path.join(VENV_BIN, "virusgw"), self.conf))
        say("stop it all:        sh %s   (PIDs %s)" % (stop, " ".join(str(p) for p in pids)))

    def stop(self):
        for cm in reversed(self.launchers):
            try:
                cm.__exit__(None, None, None)
            except Exception as e:
                say("stopping a launcher: %s" % e)
        self.launchers = []
        self.ftpd.stop()
        self.sink.stop()
        if self.clamd:
            self.clamd.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _content(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return ["(no log)"]


def _clamd_from_config(path):
    from scanlib import config
    try:
        return list(config.load(path, cache=False)["scanner"]["clamd"])
    except config.ConfigError as e:
        sys.exit("demo: %s" % "; ".join(e.problems))


def _answers(endpoint):
    from scanlib.config import parse_endpoint
    kind = parse_endpoint(endpoint)
    if kind[0] == "unix":
        return clamd_rig.ping_unix(kind[1], timeout=3)
    return clamd_rig.ping_tcp(kind[1], kind[2], timeout=3)


_KEPT = []


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true",
                    help="leave everything running and print how to connect")
    ap.add_argument("--clamd", action="append", metavar="ENDPOINT", default=[],
                    help="use this clamd (unix:PATH or tcp:HOST:PORT) instead of a private one")
    ap.add_argument("--config", metavar="FILE",
                    help="use the clamd that this virusgw.conf names, when it answers")
    args = ap.parse_args(argv)
    endpoints = list(args.clamd)
    if args.config:
        endpoints += _clamd_from_config(args.config)
    if endpoints:
        live = [e for e in endpoints if _answers(e)]
        if not live:
            say("demo: no answer from %s: starting a private clamd instead" % ", ".join(endpoints))
        endpoints = live
    for tool in ("swaks", "curl", "systemd-socket-activate"):
        if not shutil.which(tool) and not os.path.exists("/usr/bin/" + tool):
            sys.exit("demo: %s is not installed (make demo installs it as root)" % tool)
    if not endpoints and not clamd_rig.clamd_binary():
        sys.exit("demo: clamd is not installed (apt-get install clamav-daemon)")
    demo = Demo(args.keep, endpoints)
    status = 1
    try:
        demo.start()
        status = demo.run()
    except KeyboardInterrupt:
        say("interrupted")
        args.keep = False
    except Exception as e:
        say("demo failed: %s: %s" % (type(e).__name__, e))
        args.keep = False
    finally:
        if args.keep:
            demo.keep_running()
            # Dropping the last reference would finalize the activated()
            # generators, whose cleanup stops the launchers: hold on to it
            # until os._exit below.
            _KEPT.append(demo)
        else:
            demo.stop()
            say()
            say("stopped everything the demo started.")
    return status


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # os._exit: with --keep, interpreter shutdown would finalize the
    # activated() generators held in _KEPT, whose cleanup stops the launchers.
    os._exit(code)
