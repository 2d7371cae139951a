"""The shipped spawning configurations, run for real.

- openbsd-inetd, run privately (`inetd -d -i -R N CONF`), with the lines of
  etc/inetd.conf, only the paths substituted: the service becomes a free
  loopback port, the program the venv's launcher, the user the test
  account (`-c CONF` appended).  Also the documented alternative: `root` in
  the user field and `user =` in the configuration, so the proxy drops.
  Under inetd, fd 2 is the client's socket: the replies must be clean.
- systemd-socket-activate with the ExecStart= and Environment= of the
  shipped units (it applies none of their hardening: systemd-analyze verify
  and the docs cover that; User= is applied by the proxy's own drop).

Real clients (smtplib, ftplib) talk through them to a real sink and FTP
server with the real clamd; afterwards the per-connection process count
(children of inetd or of the launcher) returns to zero, polled with a
deadline.  Everything started here is stopped by its PID.
"""

import base64
import contextlib
import ftplib
import io
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile

import pytest

from tests.rig import procs
from tests.rig.activate import REPO, activated, free_port, wait_until
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.ftp import PyFtpd

TEST_USER = os.environ.get("VIRUSGW_TEST_USER", "virusgw-test")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
ETC = os.path.join(REPO, "etc")
INETD = "/usr/sbin/inetd"

INFECTED_MAIL = (b"Subject: infected\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
                 b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                 b"--XX\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n"
                 + base64.encodebytes(EICAR).replace(b"\n", b"\r\n") + b"--XX--\r\n")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("inetd and privilege changes need root")


def _user():
    """The unprivileged account to run as, when it exists and can read the
    checkout; else None (the tests then use root, saying so in the id)."""
    import pwd
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        if os.environ.get("CI"):
            pytest.fail("test account %s missing: `make testuser`" % TEST_USER)
        return None
    r = subprocess.run(["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid,
                        "--init-groups", os.path.join(VENV_BIN, "python"), "-c",
                        "import scanlib.config, smtpproxy.main, ftpproxy.main"],
                       capture_output=True, timeout=60, cwd="/")
    return TEST_USER if r.returncode == 0 else None


# -- shared peers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def open_dir():
    """A 0755 folder outside pytest's 0700 temp root."""
    d = tempfile.mkdtemp(prefix="virusgw-inetd-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def sink():
    from aiosmtpd.controller import Controller

    class Handler:
        def __init__(self):
            self.got = []

        async def handle_DATA(self, server, session, envelope):
            self.got.append(envelope.original_content)
            return "250 2.0.0 stored"

    handler = Handler()
    c = Controller(handler, hostname="127.0.0.1", port=free_port())
    c.start()
    c.got = handler.got
    yield c
    c.stop()


@pytest.fixture(scope="module")
def ftpd(open_dir):
    root = os.path.join(open_dir, "ftproot")
    os.mkdir(root)
    with open(os.path.join(root, "served.txt"), "wb") as f:
        f.write(b"served through the proxy\n")
    with PyFtpd(root) as s:
        yield s


@pytest.fixture
def conf(open_dir, clamd, sink, ftpd, request):
    """conf(owner) -> path of a config (user = owner) in a fresh folder under
    open_dir, whose directories `virusgw setup` made for that user."""
    counter = [0]

    def make(owner=None):
        counter[0] += 1
        d = os.path.join(open_dir, "%s-%d" % (request.node.name.replace("/", "_")[:60], counter[0]))
        os.mkdir(d)
        os.chmod(d, 0o755)
        base = random.randrange(38000, 39800)
        path = os.path.join(d, "virusgw.conf")
        with open(path, "w") as f:
            f.write("user = %s\n" % (owner or ""))
            f.write("[log]\nfile = %s/virusgw.log\nlevel = debug\n" % d)
            f.write("[spool]\ndirectory = %s/spool\n[quarantine]\ndirectory = %s/quarantine\n"
                    % (d, d))
            f.write("[scanner]\nclamd = %s\nmethod = stream\ntimeout = 20\n" % clamd.tcp_endpoint)
            f.write("[smtp]\nupstream = smtp:127.0.0.1:%d\nlocal_domains = example.com\n"
                    "timeout = 30\n" % sink.port)
            f.write("[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %d-%d\ntimeout = 30\n"
                    "data_timeout = 10\n" % (ftpd.port, base, base + 99))
        r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "setup", "-c", path],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
        assert r.returncode == 0, r.stderr
        return path
    return make


# -- real clients ----------------------------------------------------------------------

def smtp_traffic(hp, sink):
    before = len(sink.got)
    with smtplib.SMTP(hp[0], hp[1], timeout=30) as c:
        c.sendmail("a@example.org", ["b@example.com"], b"Subject: clean\r\n\r\nhello\r\n")
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@example.org", ["b@example.com"], INFECTED_MAIL)
        assert e.value.smtp_code == 554 and EICAR_NAME.encode() in e.value.smtp_error
    got = sink.got[before:]
    assert len(got) == 1 and b"hello" in got[0]


def ftp_traffic(hp, ftpd, name):
    f = ftplib.FTP()
    f.connect(hp[0], hp[1], timeout=20)
    assert f.getwelcome().startswith("220")
    f.login("user", "secret")
    f.storbinary("STOR %s.txt" % name, io.BytesIO(b"clean upload\n"))
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR %s.com" % name, io.BytesIO(EICAR))
    assert str(e.value).startswith("55")
    out = io.BytesIO()
    f.retrbinary("RETR served.txt", out.write)
    assert out.getvalue() == b"served through the proxy\n"
    f.quit()
    files = os.listdir(ftpd.root)
    assert "%s.txt" % name in files and "%s.com" % name not in files


def one_open_connection_is_one_process(hp, parent, greeting, user=None):
    """While a client is connected there is exactly one child (running as
    user, when given); this makes the count-to-zero check able to fail."""
    s = socket.create_connection(hp, timeout=20)
    try:
        assert s.recv(512).startswith(greeting)
        wait_until(lambda: len(live_children(parent)) == 1, timeout=10,
                   what="one proxy process for one connection")
        pids = procs.server_pids(s)
        assert [p for p, _ in procs.children(parent)] == pids
        if user:
            import pwd
            pw = pwd.getpwnam(user)
            st = procs.status(pids[0])
            assert (st["Uid"], st["Gid"]) == ([pw.pw_uid] * 4, [pw.pw_gid] * 4)
        return pids[0]
    finally:
        s.close()


def live_children(parent):
    return [p for p, state in procs.children(parent) if state != "Z"]


def back_to_zero(parent):
    wait_until(lambda: procs.children(parent) == [], timeout=30,
               what="per-connection processes of %d to end (and be reaped)" % parent)


# -- openbsd-inetd ---------------------------------------------------------------------

def shipped_inetd_lines():
    with open(os.path.join(ETC, "inetd.conf")) as f:
        return {l.split()[0]: l.split() for l in f
                if l.strip() and not l.startswith("#")}


@contextlib.contextmanager
def inetd(lines, directory, rate=100000):
    """Run openbsd-inetd on these lines in the foreground, with -R rate
    (None: inetd's default, 256); yields its pid."""
    if not os.access(INETD, os.X_OK):
        pytest.fail("openbsd-inetd is not installed (make test installs it)")
    path = os.path.join(directory, "inetd.conf")
    with open(path, "w") as f:
        f.write("".join("\t".join(l) + "\n" for l in lines))
    log = open(os.path.join(directory, "inetd.out"), "wb")
    proc = subprocess.Popen([INETD, "-d", "-i"] + (["-R", str(rate)] if rate else []) + [path],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    try:
        ports = [int(l[0].rsplit(":", 1)[1]) for l in lines]
        wait_until(lambda: proc.poll() is not None or all(procs.listening(p) for p in ports),
                   timeout=15, what="inetd listening")
        assert proc.poll() is None, "inetd exited: %s" % open(log.name).read()
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def substituted(line, port, user, conf_path):
    """A shipped inetd line with only the paths substituted."""
    service, socktype, proto, wait, _user, program, argv0 = line[:7]
    assert program.startswith("/usr/local/sbin/")
    return (["127.0.0.1:%d" % port, socktype, proto, wait, user,
             os.path.join(VENV_BIN, os.path.basename(program)), argv0]
            + line[7:] + ["-c", conf_path])


def test_inetd_runs_both_shipped_lines(conf, sink, ftpd, open_dir):
    _need_root()
    user = _user() or "root"
    # inetd starts the proxies as the configured user itself: the drop in
    # the proxy is then a no-op ("started as that user").
    path = conf(owner=user) if user != "root" else conf()
    lines = shipped_inetd_lines()
    smtp_port, ftp_port = free_port(), free_port()
    with inetd([substituted(lines["smtp"], smtp_port, user, path),
                substituted(lines["ftp"], ftp_port, user, path)],
               os.path.dirname(path)) as pid:
        hp_smtp, hp_ftp = ("127.0.0.1", smtp_port), ("127.0.0.1", ftp_port)
        one_open_connection_is_one_process(hp_smtp, pid, b"220 ", user)
        back_to_zero(pid)
        smtp_traffic(hp_smtp, sink)
        ftp_traffic(hp_ftp, ftpd, "via-inetd")
        back_to_zero(pid)
        one_open_connection_is_one_process(hp_ftp, pid, b"220 ", user)
        back_to_zero(pid)
    if user != "root":
        with open(os.path.join(os.path.dirname(path), "virusgw.log")) as f:
            assert "verdict=infected" in f.read()


def test_inetd_root_line_and_configured_user_drop(conf, sink, open_dir):
    """The documented alternative: inetd starts the proxy as root and the
    configuration's `user` makes it drop before reading input."""
    _need_root()
    user = _user()
    if user is None:
        pytest.skip("test account missing or cannot read the checkout")
    import pwd
    pw = pwd.getpwnam(user)
    path = conf(owner=user)
    port = free_port()
    line = substituted(shipped_inetd_lines()["smtp"], port, "root", path)
    with inetd([line], os.path.dirname(path)) as pid:
        hp = ("127.0.0.1", port)
        s = socket.create_connection(hp, timeout=20)
        assert s.recv(512).startswith(b"220 ")
        child = wait_until(lambda: procs.server_pids(s), timeout=10, what="proxy pid")[0]
        assert procs.status(child)["Uid"] == [pw.pw_uid] * 4
        s.sendall(b"QUIT\r\n")
        assert s.recv(512).startswith(b"221 ")
        s.close()
        smtp_traffic(hp, sink)
        back_to_zero(pid)


def test_inetd_client_sees_no_stderr(conf, open_dir):
    """Under inetd fd 2 is the client's socket: a broken configuration must
    give one 421 line and nothing else (no traceback, no warning)."""
    _need_root()
    path = conf()
    with open(path, "a") as f:
        f.write("[smtp]\nno_such_key = 1\n")
    lines = shipped_inetd_lines()
    smtp_port, ftp_port = free_port(), free_port()
    with inetd([substituted(lines["smtp"], smtp_port, "root", path),
                substituted(lines["ftp"], ftp_port, "root", path)],
               os.path.dirname(path)) as pid:
        for port in (smtp_port, ftp_port):
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            assert re.match(rb"^421[ -][^\r\n]*\r\n$", data), data
        back_to_zero(pid)


# -- systemd-socket-activate with the shipped units ----------------------------------------

def unit_exec(proto, conf_path):
    """(argv, env) of the shipped @.service, paths substituted."""
    with open(os.path.join(ETC, "systemd", "virusgw-%sproxy@.service" % proto)) as f:
        text = f.read()
    execstart = re.search(r"(?m)^ExecStart=(.*)$", text).group(1)
    argv = execstart.lstrip("-").split()
    assert argv[0].startswith("/usr/local/sbin/")
    argv[0] = os.path.join(VENV_BIN, os.path.basename(argv[0]))
    env = {}
    for value in re.findall(r"(?m)^Environment=(.*)$", text):
        for item in value.split():
            k, _, v = item.partition("=")
            env[k] = v.replace("/etc/virusgw.conf", conf_path)
    assert env.get("VIRUSGW_CONF") == conf_path
    user = re.search(r"(?m)^User=(.*)$", text).group(1)
    return argv, env, user


def _launcher_pid(port):
    pids = [p for p in procs.matching(b"systemd-socket-activate")
            if b"127.0.0.1:%d\0" % port in open("/proc/%d/cmdline" % p, "rb").read()]
    assert len(pids) == 1
    return pids[0]


@pytest.mark.parametrize("proto", ["smtp", "ftp"])
def test_socket_activation_with_the_shipped_unit(proto, conf, sink, ftpd, open_dir):
    _need_root()
    user = _user()
    path = conf(owner=user) if user else conf()
    argv, env, unit_user = unit_exec(proto, path)
    assert unit_user == "virusgw"
    env["VIRUSGW_CACHE_DIR"] = ""
    # activated() names each variable with -E: systemd-socket-activate, like
    # systemd with a unit's Environment=, hands on nothing else.
    with activated(argv, env=env) as hp:
        parent = _launcher_pid(hp[1])
        one_open_connection_is_one_process(hp, parent, b"220 ", user)
        back_to_zero(parent)
        if proto == "smtp":
            smtp_traffic(hp, sink)
        else:
            ftp_traffic(hp, ftpd, "via-socket-unit")
        back_to_zero(parent)


# -- make demo ---------------------------------------------------------------------------

def _demo(*args):
    return subprocess.run([os.path.join(VENV_BIN, "python"), os.path.join(REPO, "tests", "demo.py")]
                          + list(args), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_demo_shows_every_outcome_and_stops_everything():
    _need_root()
    r = _demo()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    work = re.search(r"(?m)^work folder: (\S+)$", r.stdout).group(1)
    summary = r.stdout.split("== summary ", 1)[1]
    assert summary.count(" ok\n") == 8 and "UNEXPECTED" not in summary
    assert "<** 554 5.7.1" in r.stdout and "< 226 " in r.stdout and "< 550" in r.stdout
    assert "the quarantine: virusgw quarantine list" in r.stdout
    assert procs.matching(work) == [] and not os.path.exists(work)


def test_demo_keep_leaves_it_running_until_its_stop_script():
    _need_root()
    r = _demo("--keep")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    stop = re.search(r"(?m)^stop it all:\s+sh (\S+)", r.stdout).group(1)
    pids = [int(p) for p in re.search(r"\(PIDs ([0-9 ]+)\)", r.stdout).group(1).split()]
    work = os.path.dirname(stop)
    try:
        assert len(pids) == 5      # clamd, sink, FTP server, two launchers
        port = int(re.search(r"(?m)^SMTP proxy\s+127\.0\.0\.1:(\d+)", r.stdout).group(1))
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.sendmail("a@example.org", ["b@example.com"], b"Subject: by hand\r\n\r\nhi\r\n")
        assert len([n for n in os.listdir(os.path.join(work, "sink")) if n.endswith(".eml")]) == 2
    finally:
        subprocess.run(["sh", stop], timeout=60)
        wait_until(lambda: procs.matching(work) == [], timeout=30,
                   what="the demo's processes to stop")
        shutil.rmtree(work, ignore_errors=True)


def test_shipped_spawn_limit_outlasts_inetds_default():
    """openbsd-inetd stops a service for ten minutes after 256 spawns in a
    minute unless the line says nowait.N (on ports >= 1024, as here, it
    closes further connections unserved instead): with the shipped wait
    field a burst of 300 connections is served, with plain `nowait` it is
    not.  (/bin/echo stands in for the proxy: what is tested is inetd's
    limit, cheaply.)"""
    _need_root()
    shipped_wait = shipped_inetd_lines()["smtp"][3]
    assert int(shipped_wait.split(".")[1]) > 300
    d = tempfile.mkdtemp(prefix="virusgw-inetd-rate-")
    try:
        results = {}
        for wait in (shipped_wait, "nowait"):
            port = free_port()
            line = ["127.0.0.1:%d" % port, "stream", "tcp", wait, "root", "/bin/echo",
                    "echo", "served"]
            with inetd([line], d, rate=None):
                served = 0
                for _ in range(300):
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                            s.settimeout(10)
                            served += s.recv(64) == b"served\n"
                    except OSError:
                        pass
                results[wait] = served
        assert results[shipped_wait] == 300
        assert results["nowait"] < 300     # 255 here: the 256th spawn trips the limit
    finally:
        shutil.rmtree(d, ignore_errors=True)
