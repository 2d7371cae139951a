"""The warm forking mode (scanlib/prefork.py) through the real launchers:
under `systemd-socket-activate -l` WITHOUT --inetd (the listening socket
as fd 3, LISTEN_FDS=1, the program started once, as a systemd .socket with
Accept=no) and inetd-`wait` style (the listening socket on fds 0, 1 and 2,
handed by this test as inetd would), with the real clamd fixture, the
aiosmtpd sink and a pyftpdlib server.

Also: the launchers' per-connection path is unchanged, and listening()
tells a listening socket from a connected one, a pipe and foreign
LISTEN_* variables.
"""

import contextlib
import ftplib
import io
import os
import signal
import smtplib
import socket
import subprocess
import threading

import pytest

from tests.rig.activate import (ACTIVATE, REPO, VENV_BIN, activated, free_port, wait_until,
                                write_config)
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.ftp import PyFtpd
from tests.rig.smtp import Dialogue, Sink

PYTHON = os.path.join(VENV_BIN, "python")
MODES = ["systemd", "inetd-wait"]

CLEAN = (b"From: s@example.com\r\nTo: r@example.net\r\nSubject: clean %d\r\n"
         b"Message-ID: <c%d@x>\r\n\r\nhello %d\r\n.leading dot\r\n")


def launcher(name, conf):
    """The repository's launcher (bin/, as shipped) under the venv's python."""
    return [PYTHON, os.path.join(REPO, "bin", name), "-c", conf]


class Parent:
    """A prefork parent started either way; .pid is the one process that
    must serve every connection, .port where it listens."""

    def __init__(self, argv, mode, env=None):
        self.argv, self.mode, self.extra_env = argv, mode, dict(env or {})
        self.port = free_port()
        self.proc = None

    def start(self):
        env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin"))
        env.pop("LISTEN_FDS", None)
        env.pop("LISTEN_PID", None)
        env.update(self.extra_env)
        passed = sum((["-E", "%s=%s" % kv] for kv in sorted(self.extra_env.items())), [])
        if self.mode == "systemd":
            bind = "127.0.0.1:%d" % self.port
            self.proc = subprocess.Popen(
                [ACTIVATE, "-l", bind, "-E", "PATH=" + env["PATH"]] + passed + self.argv,
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
            # It execs the program in place at the first connection.
            wait_until(lambda: self.proc.poll() is not None or _listening(self.port),
                       timeout=15, what="systemd-socket-activate listening")
        else:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(64)
            try:        # inetd `wait`: the listener is stdin, stdout and stderr
                self.proc = subprocess.Popen(self.argv, env=env, stdin=ls.fileno(),
                                             stdout=ls.fileno(), stderr=ls.fileno(),
                                             start_new_session=True)
            finally:
                ls.close()
        assert self.proc.poll() is None
        return self

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def children(self):
        try:
            with open("/proc/%d/task/%d/children" % (self.proc.pid, self.proc.pid)) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def serving(self):
        """The parent is our launcher under the venv's python (systemd mode:
        systemd-socket-activate has exec'd it in place, same pid)."""
        with open("/proc/%d/cmdline" % self.proc.pid, "rb") as f:
            argv = f.read().split(b"\0")
        return self.proc.poll() is None and argv[0] == PYTHON.encode()


def _listening(port):
    hexport = ":%04X" % port
    with open("/proc/net/tcp") as f:
        return any(l.split()[1].endswith(hexport) and l.split()[3] == "0A" for l in f)


@contextlib.contextmanager
def parent(argv, mode, env=None):
    p = Parent(argv, mode, env).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


def smtp_conf(tmp_path, clamd, sink, extra=""):
    return write_config(tmp_path, "[scanner]\nclamd = %s\ntimeout = 20\n"
                        "[smtp]\nupstream = %s\nlocal_domains = example.net\n%s"
                        % (", ".join(clamd.endpoints), sink.upstream, extra))


def send(port, msg):
    """(code, text) of the final DATA reply through smtplib."""
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        s.ehlo("client.example.com")
        try:
            s.sendmail("s@example.com", ["r@example.net"], msg)
            return 250, ""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
    finally:
        try:
            s.quit()
        except smtplib.SMTPException:
            pass


def log_of(tmp_path):
    p = os.path.join(str(tmp_path), "virusgw.log")
    return open(p).read() if os.path.exists(p) else ""


def contents(sink):
    """Message bodies the sink got, without our two prepended headers."""
    out = []
    for _, _, body, _ in sink.messages:
        assert body.startswith(b"X-Virus-Scanned: ")
        out.append(body.split(b"\r\n", 2)[2])
    return out


# -- SMTP ---------------------------------------------------------------------------

@pytest.mark.clamd
@pytest.mark.parametrize("mode", MODES)
def test_smtp_many_connections_one_parent(tmp_path, clamd, sink, mode):
    conf = smtp_conf(tmp_path, clamd, sink)
    with parent(launcher("virusgw-smtpproxy", conf), mode) as p:
        sent = []
        for i in range(8):                          # sequential
            msg = CLEAN % (i, i, i)
            assert send(p.port, msg) == (250, "")
            sent.append(msg)
        pid = p.proc.pid
        assert p.serving()
        code, text = send(p.port, b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
        assert code == 554 and EICAR_NAME in text
        results = {}

        def one(i):
            results[i] = send(p.port, CLEAN % (i, i, i))
        threads = [threading.Thread(target=one, args=(i,)) for i in range(100, 112)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: (250, "") for i in range(100, 112)}
        sent += [CLEAN % (i, i, i) for i in range(100, 112)]
        assert sorted(contents(sink)) == sorted(sent)
        assert p.proc.pid == pid and p.serving()     # one parent throughout
        wait_until(lambda: p.children() == [], timeout=15, what="every child reaped")
        log = log_of(tmp_path)
        assert log.count("prefork: pid %d serving" % pid) == 1
        # 21 sessions, each logged by its own child, none by the parent
        ends = [l for l in log.splitlines() if "conn=end" in l]
        assert len(ends) == 21
        assert not any("[%d]" % pid in l for l in ends)


@pytest.mark.clamd
def test_smtp_max_children_holds_the_next_client_in_the_backlog(tmp_path, clamd, sink):
    conf = smtp_conf(tmp_path, clamd, sink, "[prefork]\nmax_children = 2\n")
    with parent(launcher("virusgw-smtpproxy", conf), "inetd-wait") as p:
        held = [Dialogue("127.0.0.1", p.port) for _ in range(2)]
        for d in held:
            assert d.reply()[0] == 220
        assert len(p.children()) == 2
        third = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        third.settimeout(1.0)            # the parent accepts in ~1 ms when it may
        with pytest.raises(socket.timeout):
            third.recv(100)
        assert len(p.children()) == 2
        held[0].send(b"QUIT\r\n")
        assert held[0].reply()[0] == 221
        held[0].close()
        third.settimeout(20)
        assert third.recv(100).startswith(b"220 ")
        third.close()
        held[1].close()
        wait_until(lambda: p.children() == [], timeout=15, what="every child reaped")


@pytest.mark.clamd
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_stops_accepting_and_lets_the_session_finish(tmp_path, clamd, sink, mode):
    conf = smtp_conf(tmp_path, clamd, sink)
    with parent(launcher("virusgw-smtpproxy", conf), mode) as p:
        d = Dialogue("127.0.0.1", p.port)
        assert d.reply()[0] == 220
        d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\n")
        assert [d.reply()[0] for _ in range(3)] == [250, 250, 250]
        os.kill(p.proc.pid, signal.SIGTERM)

        def refused():
            try:
                socket.create_connection(("127.0.0.1", p.port), timeout=5).close()
                return False
            except ConnectionRefusedError:
                return True
            except OSError:                          # e.g. reset while it closed: ask again
                return False
        wait_until(refused, timeout=15, what="the listener closed")
        assert p.proc.poll() is None                 # still waiting for our session
        d.send(b"DATA\r\n")
        assert d.reply()[0] == 354
        d.send(b"Subject: last\r\n\r\nstill delivered\r\n.\r\n")
        assert d.reply()[0] == 250
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
        d.close()
        assert p.proc.wait(timeout=20) == 0
        assert contents(sink) == [b"Subject: last\r\n\r\nstill delivered\r\n"]
        assert "prefork: stopped" in log_of(tmp_path)


@pytest.mark.clamd
def test_a_crashing_child_does_not_take_the_parent_down(tmp_path, clamd, sink):
    conf = smtp_conf(tmp_path, clamd, sink)
    with parent(launcher("virusgw-smtpproxy", conf), "systemd") as p:
        d = Dialogue("127.0.0.1", p.port)
        assert d.reply()[0] == 220
        pid = p.proc.pid
        child, = wait_until(p.children, timeout=10, what="the child")
        os.kill(child, signal.SIGSEGV)
        d.s.settimeout(10)
        assert d.s.recv(100) == b""               # the client sees the end
        d.close()
        wait_until(lambda: p.children() == [], timeout=15, what="the crashed child reaped")
        assert p.proc.pid == pid and p.serving()
        assert send(p.port, CLEAN % (1, 1, 1)) == (250, "")
        wait_until(lambda: "child %d killed by signal %d" % (child, signal.SIGSEGV)
                   in log_of(tmp_path), timeout=10, what="the crash logged")


# -- FTP ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ftpd(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftproot")
    with open(os.path.join(str(root), "eicar.com"), "wb") as f:
        f.write(EICAR)
    with PyFtpd(root) as s:
        yield s


@pytest.mark.clamd
@pytest.mark.parametrize("mode", MODES)
def test_ftp_transfers_through_one_parent(tmp_path, clamd, ftpd, mode):
    base = 35000 + (os.getpid() % 500) * 20
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\ntimeout = 20\n"
                        "[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %d-%d\n"
                        "timeout = 30\ndata_timeout = 10\n"
                        % (", ".join(clamd.endpoints), ftpd.port, base, base + 19))
    with parent(launcher("virusgw-ftpproxy", conf), mode) as p:
        pid = p.proc.pid
        errors = []

        def session(i):
            try:
                f = ftplib.FTP()
                f.connect("127.0.0.1", p.port, timeout=20)
                f.login("user", "secret")
                data = os.urandom(50000 + i)
                name = "pf-%s-%d.bin" % (mode, i)
                assert f.storbinary("STOR " + name, io.BytesIO(data)).startswith("226")
                with open(os.path.join(ftpd.root, name), "rb") as g:
                    assert g.read() == data
                out = io.BytesIO()
                assert f.retrbinary("RETR " + name, out.write).startswith("226")
                assert out.getvalue() == data
                with pytest.raises(ftplib.error_perm) as e:
                    f.retrbinary("RETR eicar.com", out.write)
                assert str(e.value).startswith("550") and EICAR_NAME in str(e.value)
                f.quit()
            except BaseException as e:
                errors.append((i, repr(e)))
        session(0)
        threads = [threading.Thread(target=session, args=(i,)) for i in range(1, 6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert errors == []
        assert p.proc.pid == pid and p.serving()
        wait_until(lambda: p.children() == [], timeout=15, what="every child reaped")


# -- the launchers' two paths --------------------------------------------------------

@pytest.mark.clamd
def test_per_connection_path_unchanged(tmp_path, clamd, sink):
    """Under --inetd -a (fd 0 a connected socket) the launcher runs main()
    once per connection, as before: a process per connection."""
    conf = smtp_conf(tmp_path, clamd, sink)
    with activated(launcher("virusgw-smtpproxy", conf)) as (host, port):
        for i in range(2):
            assert send(port, CLEAN % (i, i, i)) == (250, "")
        # (inside: leaving stops the launcher's process group, proxies too)
        wait_until(lambda: log_of(tmp_path).count("conn=end") == 2, timeout=10,
                   what="two sessions logged")
    log = log_of(tmp_path)
    assert "prefork" not in log
    pids = {l.split("[", 1)[1].split("]", 1)[0] for l in log.splitlines() if "conn=end" in l}
    assert len(pids) == 2


PROBE = ("import os, sys; sys.path.insert(0, %r); from scanlib.prefork import listening; "
         "os.write(%%d, repr(listening()).encode())" % REPO)


def probe(stdin):
    """listening() in a fresh interpreter with the given stdin; its answer
    comes back over a pipe (stdout may be the socket under test)."""
    r, w = os.pipe()
    try:
        cmd = [PYTHON, "-c", PROBE % w]
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        subprocess.run(cmd, stdin=stdin, stdout=subprocess.DEVNULL, env=env,
                       pass_fds=(w,), timeout=30, check=True)
        os.close(w)
        w = None
        return os.read(r, 100).decode()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_listening_tells_the_cases_apart():
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    conn = socket.create_connection(ls.getsockname())
    acc, _ = ls.accept()
    try:
        assert probe(ls.fileno()) == "0"                      # inetd wait
        assert probe(acc.fileno()) == "None"                  # inetd nowait: connected
        assert probe(subprocess.DEVNULL) == "None"            # by hand
        rp, wp = os.pipe()
        try:
            assert probe(rp) == "None"
        finally:
            os.close(rp)
            os.close(wp)
        # systemd Accept=no: fd 3 and LISTEN_PID = the program's own pid (a
        # python puts the listener on fd 3 and execs the probe: same pid).
        for own_pid, want in ((True, "3"), (False, "None")):
            r, w = os.pipe()
            try:
                execer = ("import os; os.dup2(%d, 3); os.environ['LISTEN_FDS'] = '1'; "
                          "os.environ['LISTEN_PID'] = str(os.getpid() if %s else 1); "
                          "os.execv(%r, [%r, '-c', %r])"
                          % (ls.fileno(), own_pid, PYTHON, PYTHON, PROBE % w))
                env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
                subprocess.run([PYTHON, "-c", execer], stdin=subprocess.DEVNULL, env=env,
                               pass_fds=(ls.fileno(), w), timeout=30, check=True)
                os.close(w)
                w = None
                assert os.read(r, 100).decode() == want, own_pid
            finally:
                os.close(r)
                if w is not None:
                    os.close(w)
    finally:
        for s in (conn, acc, ls):
            s.close()



# -- the shipped units ---------------------------------------------------------------

PREFORK_UNITS = ["virusgw-smtpproxy-prefork.socket", "virusgw-smtpproxy-prefork.service"]


def _verify(directory, tmp_path):
    man = tmp_path / "man"
    for page in os.listdir(os.path.join(REPO, "man")):
        sect = man / ("man" + page[-1])
        sect.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(REPO, "man", page), str(sect / page))
    r = subprocess.run(["systemd-analyze", "verify"] + ["./" + u for u in PREFORK_UNITS],
                       cwd=directory, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MANPATH=str(man), SYSTEMD_LOG_COLOR="0"))
    return r.returncode, (r.stdout + r.stderr).strip()


def test_prefork_units_verify(tmp_path):
    etc = os.path.join(REPO, "etc", "systemd")
    assert _verify(etc, tmp_path) == (0, "")
    # with the venv's real launcher, so that verify also checks it exists
    d = tmp_path / "units"
    d.mkdir()
    for u in PREFORK_UNITS:
        text = open(os.path.join(etc, u)).read()
        (d / u).write_text(text.replace("ExecStart=-/usr/local/sbin/", "ExecStart=%s/" % VENV_BIN))
    assert _verify(str(d), tmp_path / "m2") == (0, "")
    sock = open(os.path.join(etc, PREFORK_UNITS[0])).read()
    svc = open(os.path.join(etc, PREFORK_UNITS[1])).read()
    assert "\nAccept=no\n" in sock and "\nStandardInput=socket\n" in svc
    assert "\nKillMode=mixed\n" in svc and "\nUser=virusgw\n" in svc


def test_inetd_wait_example_is_commented_out():
    text = open(os.path.join(REPO, "etc", "inetd.conf")).read()
    wait = [l for l in text.splitlines() if "\twait\t" in l or " wait " in l.replace("\t", " ")]
    assert wait and all(l.startswith("#") for l in wait)
    assert any("virusgw-smtpproxy" in l for l in wait)


# -- privileges: a root parent, children dropped as in the per-connection mode ---------

from tests.test_privs import _assert_dropped, dropped_env, open_dir  # noqa: E402,F401 (fixtures)


@pytest.mark.clamd
def test_root_parent_children_drop_to_user(dropped_env, sink):
    from tests.rig import procs
    conf = dropped_env("[smtp]\nupstream = %s\nlocal_domains = example.net\n" % sink.upstream)
    argv = launcher("virusgw-smtpproxy", conf)
    log = os.path.join(dropped_env.dir, "log", "virusgw.log")
    if os.path.exists(log):         # as after a log rotation: the root parent makes it anew
        os.unlink(log)
    with parent(argv, "inetd-wait", dropped_env.env) as p:
        assert procs.status(p.proc.pid)["Uid"][0] == 0      # the parent keeps its rights
        with socket.create_connection(("127.0.0.1", p.port), timeout=20) as s:
            assert s.recv(512).startswith(b"220 ")
            child, = wait_until(p.children, timeout=10, what="the child")
            _assert_dropped(child, dropped_env)
            s.sendall(b"QUIT\r\n")
            assert s.recv(512).startswith(b"221 ")
        assert send(p.port, CLEAN % (1, 1, 1)) == (250, "")
        code, text = send(p.port, b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
        assert code == 554 and EICAR_NAME in text
        wait_until(lambda: open(log).read().count("conn=end") == 3, timeout=10,
                   what="three sessions logged by the dropped children")
        assert os.stat(log).st_uid == dropped_env.uid
        assert "prefork: pid %d serving" % p.proc.pid in open(log).read()
    assert len(contents(sink)) == 1


@pytest.mark.clamd
def test_a_config_change_applies_to_the_next_connection(tmp_path, clamd, sink):
    def greeting():
        with socket.create_connection(("127.0.0.1", p.port), timeout=20) as s:
            s.settimeout(20)
            line = s.makefile("rb").readline()
            s.sendall(b"QUIT\r\n")
            return line
    conf = smtp_conf(tmp_path, clamd, sink, "hostname = first.example\n")
    with parent(launcher("virusgw-smtpproxy", conf), "systemd") as p:
        assert greeting().startswith(b"220 first.example ")
        smtp_conf(tmp_path, clamd, sink, "hostname = second.example.org\n")
        assert greeting().startswith(b"220 second.example.org ")
        assert p.serving()
