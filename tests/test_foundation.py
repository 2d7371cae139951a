"""The pure and small parts of scanlib: verdicts, policy (a full matrix),
addresses and direction, the spool, logging, and the installed launchers."""

import ipaddress
import itertools
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from scanlib import log, net, policy
from scanlib.spool import Spool, make_spool_dir
from scanlib.verdict import Clean, Infected, Unscannable, strongest, strength

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PY = sys.executable

# -- verdicts ------------------------------------------------------------------------

UNAV = Unscannable("unavailable", "down")
SIZE = Unscannable("size-limit", "big")
ENC = Unscannable("encrypted", "zip")
VIRUS = Infected(["A"])


def test_verdict_values():
    assert Clean() == Clean() and Clean().clean
    assert Infected(["A", "B", "A", ""]).names == ("A", "B")
    assert Infected("A") == Infected(["A"])
    assert Unscannable("size-limit", "x") == Unscannable("size-limit", "y")   # detail is talk
    assert Unscannable("size-limit") != Unscannable("encrypted")
    assert Clean() != Unscannable("unavailable")
    assert len({Clean(), Clean(), VIRUS, Infected("A"), SIZE, ENC}) == 4
    for v in (VIRUS, SIZE, ENC, UNAV):
        assert not v.clean
    with pytest.raises(ValueError):
        Infected([])
    with pytest.raises(ValueError):
        Infected(["", None])
    with pytest.raises(ValueError):
        Unscannable("clean")


@pytest.mark.parametrize("verdicts,want", [
    ([], Clean()),
    ([Clean(), Clean()], Clean()),
    ([Clean(), UNAV], UNAV),
    ([UNAV, SIZE], SIZE),
    ([SIZE, UNAV, Clean()], SIZE),
    ([ENC, UNAV], ENC),
    ([UNAV, SIZE, VIRUS], VIRUS),
    ([Infected(["A"]), SIZE, Infected(["B", "A"])], Infected(["A", "B"])),
])
def test_strongest(verdicts, want):
    got = strongest(verdicts)
    assert got == want
    if isinstance(want, Infected):
        assert got.names == want.names


VERDICTS = st.one_of(
    st.just(Clean()),
    st.builds(Infected, st.lists(st.sampled_from(["A", "B", "C"]), min_size=1)),
    st.builds(Unscannable, st.sampled_from(["unavailable", "size-limit", "encrypted"])))


@given(st.lists(VERDICTS, max_size=8), st.randoms())
def test_strongest_properties(verdicts, rnd):
    s = strongest(verdicts)
    assert strength(s) == max([strength(v) for v in verdicts] or [0])
    assert isinstance(s, Clean) == all(isinstance(v, Clean) for v in verdicts)
    names = {n for v in verdicts if isinstance(v, Infected) for n in v.names}
    assert (set(s.names) if isinstance(s, Infected) else set()) == names
    shuffled = list(verdicts)
    rnd.shuffle(shuffled)
    assert strength(strongest(shuffled)) == strength(s)


# -- policy: the full matrix -----------------------------------------------------------

SMTP_ACTIONS = ("pass", "reject", "discard", "strip", "replace", "quarantine")
FTP_ACTIONS = ("pass", "delete", "quarantine")
ON_UNAVAILABLE = ("tempfail", "reject", "pass")
ON_UNSCANNABLE = ("reject", "quarantine", "pass")
ON_MALFORMED = ("reject", "quarantine", "pass")
ALL_VERDICTS = (Clean(), VIRUS, SIZE, ENC, UNAV)


def smtp_expected(v, malformed, action, on_malformed, on_unavailable, on_unscannable):
    """The design's table, written out independently of scanlib.policy."""
    if isinstance(v, Infected):
        return {"reject": ("infected", "reject", 554, "5.7.1"),
                "discard": ("infected", "discard", 250, "2.7.0")}.get(
                    action, ("infected", action, None, None))
    if malformed:
        return {"reject": ("malformed", "reject", 554, "5.6.0"),
                "quarantine": ("malformed", "hold", 250, "2.7.0"),
                "pass": ("malformed", "pass", None, None)}[on_malformed]
    if isinstance(v, Unscannable) and v.reason != "unavailable":
        code, status = (552, "5.3.4") if v.reason == "size-limit" else (554, "5.7.0")
        return {"reject": ("unscannable", "reject", code, status),
                "quarantine": ("unscannable", "hold", 250, "2.7.0"),
                "pass": ("unscannable", "pass", None, None)}[on_unscannable]
    if isinstance(v, Unscannable):
        return {"tempfail": ("unavailable", "tempfail", 451, "4.7.0"),
                "reject": ("unavailable", "reject", 554, "5.7.0"),
                "pass": ("unavailable", "pass", None, None)}[on_unavailable]
    return ("clean", "deliver", None, None)


@pytest.mark.parametrize("v", ALL_VERDICTS, ids=repr)
@pytest.mark.parametrize("malformed", [False, True])
def test_smtp_policy_matrix(v, malformed):
    for action, on_mal, on_unav, on_unsc in itertools.product(
            SMTP_ACTIONS, ON_MALFORMED, ON_UNAVAILABLE, ON_UNSCANNABLE):
        view = {"action": action, "on_malformed": on_mal}
        scanner = {"on_unavailable": on_unav, "on_unscannable": on_unsc}
        got = policy.smtp(v, malformed, view, scanner)
        assert tuple(got) == smtp_expected(v, malformed, action, on_mal, on_unav, on_unsc), \
            (v, malformed, action, on_mal, on_unav, on_unsc)
        # nothing but a clean, well-formed message is delivered without a cause
        assert (got.action == "deliver") == (v == Clean() and not malformed)
        if got.code is not None:
            assert str(got.code)[0] == got.status[0]


def ftp_expected(v, upload, action, on_unavailable, on_unscannable):
    if isinstance(v, Infected):
        if action == "pass":
            return ("infected", "pass", None, None)
        return ("infected", action, 551 if upload else 550, None)
    if isinstance(v, Unscannable) and v.reason != "unavailable":
        if on_unscannable == "pass":
            return ("unscannable", "pass", None, None)
        code = (552 if v.reason == "size-limit" else 551) if upload else 550
        return ("unscannable", "quarantine" if on_unscannable == "quarantine" else "reject",
                code, None)
    if isinstance(v, Unscannable):
        return {"tempfail": ("unavailable", "tempfail", 451, None),
                "reject": ("unavailable", "reject", 550, None),
                "pass": ("unavailable", "pass", None, None)}[on_unavailable]
    return ("clean", "pass", None, None)


@pytest.mark.parametrize("v", ALL_VERDICTS, ids=repr)
@pytest.mark.parametrize("upload", [False, True])
def test_ftp_policy_matrix(v, upload):
    for action, on_unav, on_unsc in itertools.product(FTP_ACTIONS, ON_UNAVAILABLE,
                                                      ON_UNSCANNABLE):
        got = policy.ftp(v, {"action": action},
                         {"on_unavailable": on_unav, "on_unscannable": on_unsc}, upload)
        assert tuple(got) == ftp_expected(v, upload, action, on_unav, on_unsc), \
            (v, upload, action, on_unav, on_unsc)
        if got.code is not None:
            assert 400 <= got.code < 600


def test_permanent_refusal_beats_temporary():
    """One part unavailable (tempfail), another over a size limit (reject):
    the message is refused permanently, not deferred."""
    scanner = {"on_unavailable": "tempfail", "on_unscannable": "reject"}
    d = policy.smtp(strongest([UNAV, SIZE]), False, {"action": "reject",
                                                     "on_malformed": "reject"}, scanner)
    assert (d.action, d.code) == ("reject", 552)
    d = policy.ftp(strongest([UNAV, ENC]), {"action": "delete"}, scanner, True)
    assert (d.action, d.code) == ("reject", 551)


def test_policy_is_pure():
    view = {"action": "reject", "on_malformed": "reject"}
    scanner = {"on_unavailable": "tempfail", "on_unscannable": "reject"}
    before = (dict(view), dict(scanner))
    for v in ALL_VERDICTS:
        policy.smtp(v, False, view, scanner)
    assert (view, scanner) == before


# -- addresses and direction ---------------------------------------------------------------

INSIDE = net.Networks(["127.0.0.0/8", "::1/128", "10.0.0.0/8", "192.168.0.0/16", "fc00::/7"])


@pytest.mark.parametrize("text,want", [
    ("10.1.2.3", "10.1.2.3"),
    ("::ffff:10.1.2.3", "10.1.2.3"),
    ("::FFFF:192.0.2.1", "192.0.2.1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    (" 127.0.0.1 ", "127.0.0.1"),
    (ipaddress.ip_address("::ffff:127.0.0.1"), "127.0.0.1"),
])
def test_normalise(text, want):
    assert str(net.normalise(text)) == want


@pytest.mark.parametrize("text", ["", "example.com", "10.0.0.256", "[::1", "1.2.3.4:25", "::g"])
def test_normalise_rejects(text):
    with pytest.raises(ValueError):
        net.normalise(text)


@pytest.mark.parametrize("addr,inside", [
    ("10.0.0.1", True), ("::ffff:10.0.0.1", True), ("192.168.255.255", True),
    ("127.0.0.1", True), ("::1", True), ("fd12::1", True), ("::ffff:127.0.0.1", True),
    ("203.0.113.5", False), ("::ffff:203.0.113.5", False), ("2001:db8::1", False),
    ("::10.0.0.1", False),          # IPv4-compatible (deprecated) is not IPv4-mapped
    ("garbage", False), ("", False),
])
def test_inside(addr, inside):
    assert (addr in INSIDE) is inside


@pytest.mark.parametrize("client,want", [
    ("10.0.0.5", "outbound"), ("::ffff:10.0.0.5", "outbound"), ("fd00::5", "outbound"),
    ("203.0.113.9", "inbound"), ("::ffff:203.0.113.9", "inbound"), ("2001:db8::9", "inbound"),
])
def test_smtp_direction(client, want):
    assert net.smtp_direction(client, INSIDE) == want


@pytest.mark.parametrize("source,dest,want", [
    ("203.0.113.1", "10.0.0.2", "inbound"),            # download by an inside client
    ("2001:db8::1", "fd00::2", "inbound"),
    ("::ffff:203.0.113.1", "::ffff:10.0.0.2", "inbound"),
    ("10.0.0.2", "203.0.113.1", "outbound"),           # upload to an outside server
    ("fd00::2", "2001:db8::1", "outbound"),
    ("10.0.0.2", "192.168.1.1", None),                 # inside to inside: base section
    ("203.0.113.1", "198.51.100.1", None),             # outside to outside
    ("2001:db8::1", "203.0.113.1", None),
])
def test_ftp_direction(source, dest, want):
    assert net.ftp_direction(source, dest, INSIDE) == want


@pytest.mark.parametrize("addr,public", [
    ("203.0.113.7", True), ("8.8.8.8", True), ("2001:4860::8888", True),
    ("10.0.0.1", False), ("127.0.0.1", False), ("::ffff:127.0.0.1", False), ("::1", False),
    ("169.254.1.1", False), ("fe80::1", False), ("0.0.0.0", False), ("::", False),
    ("224.0.0.1", False), ("ff02::1", False), ("240.0.0.1", False), ("fd00::1", False),
    ("nonsense", False),
])
def test_is_public_target(addr, public):
    assert net.is_public_target(addr, INSIDE) is public


@given(st.one_of(st.ip_addresses(), st.text(max_size=45)))
def test_direction_never_raises(addr):
    assert net.smtp_direction(str(addr), INSIDE) in ("inbound", "outbound")
    assert net.ftp_direction(str(addr), "10.0.0.1", INSIDE) in ("inbound", "outbound", None)
    assert isinstance(net.is_public_target(str(addr), INSIDE), bool)


@given(st.ip_addresses(v=4))
def test_mapped_equals_ipv4(a):
    mapped = "::ffff:%s" % a
    assert (mapped in INSIDE) == (str(a) in INSIDE)
    assert net.is_public_target(mapped, INSIDE) == net.is_public_target(str(a), INSIDE)


PEER_SCRIPT = "from scanlib.net import peer_of_stdin; print(peer_of_stdin())"


@pytest.mark.parametrize("family,host,client_host", [
    (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
    (socket.AF_INET6, "::", "127.0.0.1"),       # dual-stack: the peer comes as ::ffff:127.0.0.1
    (socket.AF_INET6, "::1", "::1"),
])
def test_peer_of_stdin(family, host, client_host):
    lis = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            lis.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        lis.bind((host, 0))
    except OSError:
        lis.close()
        pytest.skip("no %s" % host)
    lis.listen(1)
    cli = socket.create_connection((client_host, lis.getsockname()[1]), timeout=10)
    conn, _ = lis.accept()
    try:
        r = subprocess.run([PY, "-c", PEER_SCRIPT], stdin=conn.fileno(), capture_output=True,
                           text=True, timeout=30, cwd=REPO)
        assert r.stdout.strip() == str((client_host, cli.getsockname()[1]))
    finally:
        conn.close()
        cli.close()
        lis.close()


def test_peer_of_stdin_from_environment():
    for env, want in (({"REMOTE_ADDR": "::ffff:192.0.2.7", "REMOTE_PORT": "4000"},
                       ("192.0.2.7", 4000)),
                      ({"TCPREMOTEIP": "2001:db8::7", "TCPREMOTEPORT": "25"},
                       ("2001:db8::7", 25)),
                      ({"REMOTE_ADDR": "junk"}, ("", 0)),
                      ({}, ("", 0))):
        full = {k: v for k, v in os.environ.items()
                if k not in ("REMOTE_ADDR", "REMOTE_PORT", "TCPREMOTEIP", "TCPREMOTEPORT")}
        full.update(env)
        r = subprocess.run([PY, "-c", PEER_SCRIPT], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, env=full, timeout=30, cwd=REPO)
        assert r.stdout.strip() == str(want), env


# -- the spool --------------------------------------------------------------------------------

def test_spool_modes_and_cleanup(tmp_path):
    d = tmp_path / "spool"
    make_spool_dir(str(d))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o755)
    sp = Spool(str(d))
    sp.check()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    old = os.umask(0)
    try:
        f1 = sp.create()
        f2 = sp.create(suffix=".part")
    finally:
        os.umask(old)
    for f in (f1, f2):
        assert stat.S_IMODE(os.fstat(f.fileno()).st_mode) == 0o600
        assert os.path.dirname(f.name) == str(d)
    f1.write(b"abc")
    f1.seek(0)
    assert f1.read() == b"abc"
    sp.forget(f1)
    assert f1.closed and not os.path.exists(f1.name)
    assert os.path.exists(f2.name)
    sp.cleanup()
    assert os.listdir(d) == []
    sp.cleanup()        # twice is harmless


def test_spool_check_refuses_a_file(tmp_path):
    p = tmp_path / "file"
    p.write_bytes(b"")
    with pytest.raises(OSError):
        Spool(str(p)).check()


def test_spool_cleans_up_on_exceptions(tmp_path):
    with pytest.raises(RuntimeError):
        with Spool(str(tmp_path)) as sp:
            sp.create().write(b"x")
            sp.create()
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_spool_cleans_up_on_signals(tmp_path, sig):
    code = textwrap.dedent("""
        import sys, time
        from scanlib.spool import Spool, install_signal_cleanup
        install_signal_cleanup()
        sp = Spool(sys.argv[1])
        try:
            f = sp.create()
            f.write(b"data")
            f.flush()
            print(f.name, flush=True)
            time.sleep(60)
        finally:
            sp.cleanup()
        """)
    p = subprocess.Popen([PY, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         cwd=REPO)
    try:
        name = p.stdout.readline().strip()
        assert os.path.exists(name)
        p.send_signal(sig)
        assert p.wait(30) == 128 + sig
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    assert os.listdir(tmp_path) == []


def test_spool_ignores_sigpipe(tmp_path):
    code = ("import os, signal; from scanlib.spool import install_signal_cleanup; "
            "install_signal_cleanup(); r, w = os.pipe(); os.close(r)\n"
            "try:\n os.write(w, b'x')\nexcept BrokenPipeError:\n print('EPIPE')")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.stdout.strip() == "EPIPE"


# -- logging -----------------------------------------------------------------------------

@pytest.mark.parametrize("value,want", [
    ("plain", "plain"),
    ("a b", "a\\x20b"),
    ("line\r\nbreak", "line\\x0d\\x0abreak"),
    ("nul\0", "nul\\x00"),
    ('quote" back\\slash', "quote\\x22\\x20back\\x5cslash"),
    ("caf\u00e9", "caf\\xc3\\xa9"),
    ("key=value", "key=value"),
    (b"\xff\xfe", "\\xff\\xfe"),
    ("", "-"),
    (None, "-"),
    (["a", "b c"], "a,b\\x20c"),
    ([], "-"),
    (42, "42"),
    ("<user@example.com>", "<user@example.com>"),
])
def test_escape(value, want):
    assert log.escape(value) == want


def test_escape_bounds_length():
    out = log.escape("x" * 10000)
    assert out == "x" * 512 + "..."


@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_escape_is_one_safe_token(value):
    out = log.escape(value)
    assert out and all(33 <= ord(c) < 127 for c in out)
    assert " " not in out and '"' not in out


def test_summary_line():
    line = log.summary(id="Q1", client="203.0.113.5", to=["a@x", "b c@y"],
                       subject="hi\r\nBcc: evil", verdict="infected", qid=None)
    assert line == ("id=Q1 client=203.0.113.5 to=a@x,b\\x20c@y "
                    "subject=hi\\x0d\\x0aBcc:\\x20evil verdict=infected qid=-")
    assert "\n" not in line


LOG_SCRIPT = textwrap.dedent("""
    import os, sys
    from scanlib import log
    lg = log.setup("virusgw-test", sys.argv[1], debug=sys.argv[2] == "debug")
    lg.info("hello %s", "world")
    os.write(2, b"RAW-FD2\\n")
    sys.stderr.write("PY-STDERR\\n"); sys.stderr.flush()
    log.LOG.error("bad %s", "args", "too many")   # a formatting error
    try:
        1 / 0
    except ZeroDivisionError:
        lg.exception("caught %s", "it")
    print("done", flush=True)
    """)


def test_log_without_debug_silences_fd2(tmp_path):
    logfile = tmp_path / "v.log"
    r = subprocess.run([PY, "-c", LOG_SCRIPT, str(logfile), "nodebug"], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.stdout == "done\n"
    assert r.stderr == ""          # under inetd this would be the client's socket
    text = logfile.read_text()
    assert "virusgw-test[" in text and "hello world" in text
    assert "ERROR bad %s ('args', 'too many')" in text      # a bad format string is logged, not raised
    assert "ERROR caught it\nTraceback" in text and "ZeroDivisionError" in text


def test_log_with_debug_uses_stderr(tmp_path):
    logfile = tmp_path / "v.log"
    r = subprocess.run([PY, "-c", LOG_SCRIPT, str(logfile), "debug"], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert r.stdout == "done\n"
    assert "hello world" in r.stderr and "RAW-FD2" in r.stderr
    assert "ERROR caught it" in r.stderr and "ZeroDivisionError" in r.stderr


def test_log_never_raises_on_a_broken_handler(tmp_path):
    """An unwritable log file: logging goes nowhere, nothing reaches fd 2."""
    bad = tmp_path / "missing-dir" / "v.log"
    r = subprocess.run([PY, "-c", LOG_SCRIPT, str(bad), "nodebug"], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", "")


def test_log_without_file_or_syslog(tmp_path):
    if os.path.exists("/dev/log"):
        pytest.skip("this machine has /dev/log")
    r = subprocess.run([PY, "-c", LOG_SCRIPT, "", "nodebug"], capture_output=True,
                       text=True, timeout=30, cwd=REPO)
    assert (r.returncode, r.stdout, r.stderr) == (0, "done\n", "")


# -- the installed launchers and the CLI -------------------------------------------------

LAUNCHERS = ("virusgw", "virusgw-smtpproxy", "virusgw-ftpproxy")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_installed_launchers_are_plain(name):
    path = os.path.join(VENV_BIN, name)
    with open(path) as f:
        text = f.read()
    first = text.splitlines()[0]
    assert first.startswith("#!") and first[2:].startswith(os.path.join(REPO, ".venv", "bin"))
    assert "pyenv" not in first
    for bad in ("pkg_resources", "load_entry_point", "importlib.metadata", "__requires__"):
        assert bad not in text, bad


def _importtime(argv, **kw):
    r = subprocess.run([PY, "-X", "importtime"] + argv, capture_output=True, text=True,
                       timeout=60, **kw)
    modules = [l.rsplit("|", 1)[-1].strip() for l in r.stderr.splitlines()
               if l.startswith("import time:")]
    return r, modules


def test_cli_launcher_does_not_import_pkg_resources(tmp_path):
    conf = tmp_path / "v.conf"
    conf.write_text("[scanner]\ntimeout = 3\n")
    r, modules = _importtime([os.path.join(VENV_BIN, "virusgw"), "check-config", "-c",
                              str(conf)], env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
    assert r.returncode == 0 and r.stdout == "%s: ok\n" % conf
    assert "scanlib.cli" in modules and "click" in modules     # importtime saw the imports
    assert "pkg_resources" not in modules


def test_proxy_launcher_does_not_import_pkg_resources(tmp_path):
    """The proxy's own imports, seen before it points fd 2 at /dev/null."""
    r, modules = _importtime([os.path.join(VENV_BIN, "virusgw-smtpproxy"), "-c",
                              str(tmp_path / "none.conf")], stdin=subprocess.DEVNULL)
    assert "smtpproxy.main" in modules or "smtpproxy" in modules, r.stderr[-2000:]
    assert "pkg_resources" not in modules
    assert "click" not in modules            # the proxies never import click


def test_check_config_exit_codes(tmp_path):
    from scanlib.cli import main
    good = tmp_path / "good.conf"
    good.write_text("[scanner]\nmethod = stream\n")
    bad = tmp_path / "bad.conf"
    bad.write_text("[scanner]\nmethod = carrier\n")
    env = dict(os.environ, VIRUSGW_CACHE_DIR="")
    assert CliRunner().invoke(main, ["check-config", "-c", str(good)]).exit_code == 0
    res = CliRunner().invoke(main, ["check-config", "-c", str(bad)])
    assert res.exit_code == 78 and "key 'method'" in res.output
    virusgw = os.path.join(VENV_BIN, "virusgw")
    r = subprocess.run([virusgw, "check-config", "-c", str(good)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, "%s: ok\n" % good, "")
    r = subprocess.run([virusgw, "check-config", "-c", str(bad)], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 78 and r.stdout == ""
    assert r.stderr == ('virusgw: %s:2: section [scanner], key \'method\': "carrier" is not '
                        'one of: auto, fildes, stream, path\n' % bad)
    r = subprocess.run([virusgw, "check-config"], capture_output=True, text=True,
                       env=dict(env, VIRUSGW_CONF=str(bad)), timeout=60)
    assert r.returncode == 78


@given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_canonical_text_agrees_with_normalise(addr):
    """peer_of_stdin's cheap path (no ipaddress import) gives the same text
    as the full normaliser for every address the kernel can hand out."""
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    kernel = socket.inet_ntop(family, addr.packed)          # what getpeername gives
    for text in (kernel, str(addr)):
        assert net.canonical_text(text) == str(net.normalise(text))
    if addr.version == 4:
        mapped = socket.inet_ntop(socket.AF_INET6, b"\0" * 10 + b"\xff\xff" + addr.packed)
        assert net.canonical_text(mapped) == str(addr)


@pytest.mark.parametrize("name", ["virusgw-smtpproxy", "virusgw-ftpproxy"])
@pytest.mark.parametrize("args", [["--config", "/nonexistent"], ["-x"], ["-c"], ["extra"]])
def test_proxies_refuse_unknown_arguments(name, args, tmp_path):
    """A typo in an inetd line gives one 421 line and exit 64; the proxy
    never runs on some other configuration ($VIRUSGW_CONF points at a
    valid one here)."""
    good = tmp_path / "good.conf"
    good.write_text("[log]\nfile = %s\n" % (tmp_path / "v.log"))
    env = dict(os.environ, VIRUSGW_CONF=str(good), VIRUSGW_CACHE_DIR="")
    r = subprocess.run([os.path.join(VENV_BIN, name)] + args, input=b"QUIT\r\n",
                       capture_output=True, timeout=30, env=env)
    assert r.returncode == 64
    assert r.stdout.startswith(b"421 ") and r.stdout.count(b"\r\n") == 1
    assert r.stderr == b""


def test_proxy_args():
    from scanlib.config import proxy_args
    assert proxy_args([], "p") == (None, False)
    assert proxy_args(["-c", "f", "-d"], "p") == ("f", True)
    assert proxy_args(["-cf"], "p") == ("f", False)
    for bad in (["-c"], ["--config", "f"], ["-d", "x"], ["-h"]):
        with pytest.raises(ValueError, match=r"usage: p \[-c FILE\] \[-d\]"):
            proxy_args(bad, "p")
