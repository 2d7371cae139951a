"""Red team: virusgw-ftpproxy attacked as a hostile client and a hostile
server would, through the real thing (systemd-socket-activate --inetd, the
real clamd fixture, pyftpdlib from tests/rig/ftp.py, and for the hostile
server the scripted one in tests/rig/ftpattack.py).

Each test asserts the right behaviour per ../shared/DESIGN.md and issue 4.
Tests that found a bug are marked xfail(strict=True) with the reason: the
fix flips them.  After every test the spool must be empty and the log must
hold no traceback (fixture `no_leftovers`).
"""

import io
import ftplib
import os
import socket
import time
import zipfile
import gzip

import pytest

from tests.rig.activate import activated, proxy_argv, write_config, wait_until
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.ftp import Raw, recv_all
from tests.rig.ftpattack import HostileFtpd, Trap
# The proxy rig of the main FTP tests (fixtures ftpd and proxy, helpers).
from tests.test_ftp_proxy import (ftpd, proxy, client, server_file, log_text,  # noqa: F401
                                  passive_range, CLEAN)

LINGER_RST = b"\x01\x00\x00\x00\x00\x00\x00\x00"


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """After the test: the spool holds no file and no traceback was logged."""
    yield
    spool = os.path.join(str(tmp_path), "spool")
    if os.path.isdir(spool):
        wait_until(lambda: not os.listdir(spool), timeout=20, what="an empty spool")
    log = log_text(tmp_path)
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]


def no_traceback(lines):
    text = "\n".join(lines)
    assert "Traceback" not in text and "File \"" not in text, text


def hostile_proxy(proxy, srv, extra=""):
    return proxy(extra, upstream="tcp:127.0.0.1:%d" % srv.port)


def listener(host="127.0.0.1"):
    lst = socket.socket()
    lst.bind((host, 0))
    lst.listen(4)
    lst.settimeout(10)
    return lst, lst.getsockname()[1]


def port_arg(host, port):
    return "%s,%d,%d" % (host.replace(".", ","), port >> 8, port & 255)


# -- FTP bounce ---------------------------------------------------------------------

def _low_trap():
    """A trap on 127.0.0.1 below 1024 (the tests run as root)."""
    for port in range(900, 1000):
        try:
            return Trap("127.0.0.1", port)
        except OSError:
            continue
    pytest.skip("no free port below 1024")


def test_bounce_variants_refused_and_never_connected(proxy):
    """PORT/EPRT to another host, to a port < 1024, out-of-range numbers,
    odd EPRT forms: refused with the right code, and nothing is ever
    connected (traps count connections)."""
    other = Trap("127.0.0.2")
    low = _low_trap()
    try:
        hp = proxy()
        r = Raw(*hp)
        r.login()
        assert r.cmd("TYPE I")[0] == 200
        o, lo = other.port, low.port
        cases = [
            ("PORT " + port_arg("127.0.0.2", o), {500}),              # another host
            ("EPRT |1|127.0.0.2|%d|" % o, {500}),
            ("EPRT |2|::ffff:127.0.0.2|%d|" % o, {500, 522}),       # mapped form of it
            ("PORT " + port_arg("127.0.0.1", lo), {500}),             # privileged port
            ("EPRT |1|127.0.0.1|%d|" % lo, {500}),
            ("EPRT !1!127.0.0.1!%d!" % lo, {500}),                     # odd delimiter, same rule
            ("PORT 127,0,0,1,256,1", {501}),                            # field > 255 never wraps
            ("PORT 127,0,0,1,4,256", {501}),
            ("PORT 127,0,0,257,4,1", {501}),
            ("PORT 383,0,0,1,4,1", {501}),                              # 383 & 255 == 127
            ("PORT 127,0,0,1,-1,4", {501}),
            ("PORT 127,0,0,1,0,0", {501}),
            ("PORT 127,0,0,1,4", {501}),
            ("PORT 127,0,0,1,4,1,1", {501}),
            ("PORT 0x7f,0,0,1,4,1", {501}),
            ("EPRT |1|127.0.0.1|65536|", {501}),
            ("EPRT |1|127.0.0.1|+5000|", {501}),
            ("EPRT |1|127.0.0.1|5000", {501}),
            ("EPRT |1|127.1|5000|", {501}),
            ("EPRT |1|0177.0.0.1|5000|", {501}),
            ("EPRT |1|2130706433|5000|", {501}),
            ("EPRT 11127.0.0.1150001", {501}),                          # digit as delimiter
            ("EPRT |3|127.0.0.1|5000|", {522}),
            ("EPRT |2|::1|%d|" % o, {522}),                            # IPv6 from an IPv4 client
            ("EPRT |2|2001:db8::7|25|", {522}),
            ("EPRT |2|fe80::1%lo|5000|", {501, 522}),
        ]
        for line, codes in cases:
            code, lines = r.cmd(line)
            assert code in codes, (line, lines)
            no_traceback(lines)
        # nothing was set up: a transfer now has no data connection
        code, lines = r.cmd("RETR hello.txt")
        assert code == 425, lines
        assert r.cmd("NOOP")[0] == 200
        r.close()
        time.sleep(0.3)
        assert other.hits == [] and low.hits == []
    finally:
        other.close()
        low.close()


def test_bounce_to_the_server_from_an_outside_client(proxy, ftpd):
    """A client at 127.0.0.2 names the server's address (127.0.0.1) in
    PORT/EPRT: refused; its own address works."""
    trap = Trap("127.0.0.1")
    try:
        hp = proxy()
        r = Raw(*hp, source="127.0.0.2")
        r.login()
        r.cmd("TYPE I")
        assert r.cmd("PORT " + port_arg("127.0.0.1", trap.port))[0] == 500
        assert r.cmd("EPRT |1|127.0.0.1|%d|" % trap.port)[0] == 500
        assert r.cmd("PORT " + port_arg("127.0.0.1", ftpd.port))[0] == 500   # the ftpd itself
        assert r.cmd("RETR hello.txt")[0] == 425
        lst, port = listener("127.0.0.2")
        assert r.cmd("EPRT |1|127.0.0.2|%d|" % port)[0] == 200
        r.send("RETR hello.txt\r\n")
        assert r.reply()[0] == 150
        conn, peer = lst.accept()
        assert recv_all(conn) == b"hello\nworld\n"
        assert r.reply()[0] == 226
        lst.close()
        assert trap.hits == []
    finally:
        trap.close()


def test_eprt_ipv4_mapped_address_from_ipv4_client(proxy):
    """EPRT |2|::ffff:<client>|port| from an IPv4 client names the client
    itself: either 522 (use protocol 1) or a working data connection;
    never a 200 followed by a data connection that cannot work."""
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    lst, port = listener()
    code, lines = r.cmd("EPRT |2|::ffff:127.0.0.1|%d|" % port)
    assert code in (200, 522), lines
    if code == 200:
        r.send("RETR hello.txt\r\n")
        code, lines = r.reply()
        assert code == 150, lines
        conn, _ = lst.accept()
        assert recv_all(conn) == b"hello\nworld\n"
        assert r.reply()[0] == 226
    lst.close()


@pytest.mark.parametrize("delim", ["!", "a", "~", "\""])
def test_eprt_odd_delimiters_work(proxy, delim):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    lst, port = listener()
    code, lines = r.cmd("EPRT {d}1{d}127.0.0.1{d}{p}{d}".format(d=delim, p=port))
    assert code == 200, lines
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    conn, _ = lst.accept()
    assert recv_all(conn) == b"hello\nworld\n"
    assert r.reply()[0] == 226
    lst.close()


# -- passive port stealing ---------------------------------------------------------

def test_passive_port_flooded_by_stranger(proxy):
    """Ten connections from 127.0.0.2 to the client's passive port before
    the RETR: each is dropped without data, the port stays the client's."""
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    strangers = []
    for _ in range(10):
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        strangers.append(s)
    r.send("RETR clean.bin\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    assert recv_all(d) == CLEAN
    assert r.reply()[0] == 226
    for s in strangers:
        s.setblocking(True)
        try:
            assert recv_all(s, timeout=5) == b""
        except OSError:
            pass                        # never accepted at all: also fine


def test_passive_upload_not_stolen(proxy, ftpd):
    """A stranger connects first to the passive port and pushes its own
    bytes: they are never stored; the client's upload is."""
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    s = socket.socket()
    s.bind(("127.0.0.2", 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    try:
        s.sendall(b"stolen content")
    except OSError:
        pass
    r.send("STOR stolen.bin\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    d.sendall(b"the client's own content")
    d.close()
    code, lines = r.reply()
    assert code == 226, lines
    assert server_file(ftpd, "stolen.bin") == b"the client's own content"
    s.close()


# -- hostile servers ------------------------------------------------------------------

def test_server_227_naming_another_host_is_ignored(proxy):
    """The server refuses EPSV and its 227 names 127.0.0.2, where a trap
    listens on the same port number: the proxy connects to the server's
    control address, the trap sees nothing, the transfer works."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    trap = Trap("127.0.0.2", port)
    srv = HostileFtpd(files={b"f.txt": b"from the liar\n"}, epsv=False,
                      pasv_host="127.0.0.2", data_port=port)
    try:
        hp = hostile_proxy(proxy, srv)
        f = client(hp)
        out = io.BytesIO()
        assert f.retrbinary("RETR f.txt", out.write).startswith("226")
        assert out.getvalue() == b"from the liar\n"
        f.quit()
        assert trap.hits == []
        assert srv.data_peers and all(p[0] == "127.0.0.1" for p in srv.data_peers)
    finally:
        srv.stop()
        trap.close()


HOSTILE_LINES = [
    b"257-first line",
    b"257-",
    b" 226 Transfer complete",               # a reply of another code, as text
    b"226 Transfer complete",
    b"331 Password required",
    b"257-caf\xe9 \x80\xc3\x28 not UTF-8",
    b"257-" + b"A" * 4000,
    b"257-tab\there",
    b'257 "/" is the current directory',
]


def test_server_multiline_reply_with_hostile_text(proxy):
    """A multi-line reply full of lines that look like other replies,
    non-UTF-8 bytes and a long line is relayed as one reply, intact, and
    the dialogue stays in step; the server's FEAT is filtered."""
    pwd = b"\r\n".join(HOSTILE_LINES) + b"\r\n"
    welcome = (b"230-Welcome\r\n230-\xff\xfe\x80 binary\r\n331 Password required\r\n"
               b"230 Logged in\r\n")
    feat = (b"211-Features:\r\n AUTH TLS\r\n SIZE\r\n PROT\r\n MODE Z\r\n 211 fake end\r\n"
            b" MDTM\r\n211 End\r\n")
    srv = HostileFtpd(files={b"x.txt": b"x\n"},
                      replies={"PWD": pwd, "PASS": welcome, "FEAT": feat})
    try:
        hp = hostile_proxy(proxy, srv)
        r = Raw(*hp)
        assert r.reply()[0] == 220
        assert r.cmd("USER u")[0] == 331
        code, lines = r.cmd("PASS p")
        assert code == 230 and len(lines) == 4 and lines[-1] == "230 Logged in", lines
        code, lines = r.cmd("PWD")
        assert code == 257 and len(lines) == len(HOSTILE_LINES), lines
        assert lines[2] == " 226 Transfer complete" and lines[3] == "226 Transfer complete"
        assert lines[-1] == '257 "/" is the current directory'
        assert r.cmd("SYST")[0] == 215                     # in step
        code, lines = r.cmd("FEAT")
        assert code == 211 and lines[-1].startswith("211 ")
        feats = {l.strip().split(" ")[0] for l in lines[1:-1]}
        assert not feats & {"AUTH", "PROT", "MODE", "211"}, lines
        r.cmd("TYPE I")
        port = r.pasv_port()
        r.send("RETR x.txt\r\n")
        assert r.reply()[0] == 150
        assert recv_all(r.data_connect(port)) == b"x\n"
        assert r.reply()[0] == 226
        r.close()
    finally:
        srv.stop()


def _silent_after_150(c, name):
    c.send(b"150 here it (never) comes\r\n")
    d = c.accept_data()
    # hold both connections open and say nothing until the proxy gives up
    c.readline(timeout=30)
    d.close()
    return False


def test_server_150_and_never_any_data(proxy):
    """The server says 150 and never sends a byte: the client gets a
    temporary error (never 226, never data), the spool is emptied."""
    srv = HostileFtpd(on_retr=_silent_after_150)
    try:
        hp = hostile_proxy(proxy, srv, "data_timeout = 2\ntimeout = 4\n")
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        lst, port = listener()
        assert r.cmd("PORT " + port_arg("127.0.0.1", port))[0] == 200
        r.send("RETR silent.bin\r\n")
        code, lines = r.reply()
        assert 400 <= code < 500, lines
        no_traceback(lines)
        with pytest.raises(socket.timeout):
            lst.settimeout(0.5)
            lst.accept()
        lst.close()
    finally:
        srv.stop()


def test_server_150_and_never_any_data_with_progress(proxy):
    """With progress = yes the client has seen '150-' lines: whatever goes
    wrong next, that reply must end with '150 ' (a multi-line reply ends
    with the code it started with), then a 4xx."""
    srv = HostileFtpd(on_retr=_silent_after_150)
    try:
        hp = hostile_proxy(proxy, srv, "data_timeout = 4\ntimeout = 4\nprogress = yes\n"
                           "progress_interval = 1\n")
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        r.pasv_port()
        r.send("RETR silent.bin\r\n")
        first = r._line()
        assert first.startswith("150-"), first
        rest = []
        while True:
            line = r._line()
            rest.append(line)
            if not line.startswith("150-"):
                break
        assert rest[-1].startswith("150 "), rest
        code, lines = r.reply()
        assert 400 <= code < 500, lines
    finally:
        srv.stop()


def _dies_mid_download(how):
    def script(c, name):
        c.send(b"150 sending\r\n")
        d = c.accept_data()
        d.sendall(b"first half of the file\n" * 100)
        time.sleep(0.3)
        if how == "crash":
            for s in (d, c.sock):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                s.close()
            return False
        d.close()                                      # FIN, then an error on control
        c.send(b"451 local error: disk died\r\n")
        return True
    return script


@pytest.mark.parametrize("how", ["crash", "fin-then-451"])
def test_server_dies_mid_download(proxy, how):
    """The server breaks off a RETR: the client never gets 226 nor any
    data, and the spool is emptied."""
    srv = HostileFtpd(on_retr=_dies_mid_download(how))
    try:
        hp = hostile_proxy(proxy, srv, "data_timeout = 5\ntimeout = 10\n")
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        lst, port = listener()
        assert r.cmd("PORT " + port_arg("127.0.0.1", port))[0] == 200
        r.send("RETR half.bin\r\n")
        code, lines = r.reply()
        assert 400 <= code < 500, lines
        no_traceback(lines)
        lst.settimeout(0.5)
        with pytest.raises(socket.timeout):
            lst.accept()
        lst.close()
    finally:
        srv.stop()


def _dies_mid_upload(c, name):
    c.send(b"150 send it\r\n")
    d = c.accept_data()
    d.recv(100)
    for s in (d, c.sock):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        s.close()
    return False


def test_server_dies_mid_upload(proxy):
    """The server resets while the proxy uploads a scanned file: the client
    never hears 226."""
    srv = HostileFtpd(on_stor=_dies_mid_upload)
    try:
        hp = hostile_proxy(proxy, srv, "data_timeout = 5\ntimeout = 10\n")
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        port = r.pasv_port()
        r.send("STOR up.bin\r\n")
        assert r.reply()[0] == 150
        d = r.data_connect(port)
        d.sendall(os.urandom(4 << 20))
        d.close()
        code, lines = r.reply()
        assert 400 <= code < 500, lines
        no_traceback(lines)
    finally:
        srv.stop()


# -- command injection ---------------------------------------------------------------

def test_telnet_iac_never_smuggles_a_command(proxy, ftpd):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    IAC, WILL, IP, NOP, SB, SE = b"\xff", b"\xfb", b"\xf4", b"\xf1", b"\xfa", b"\xf0"
    assert r.cmd(b"NO" + IAC + NOP + b"OP")[0] == 200                 # stripped before checks
    assert r.cmd(IAC + WILL + b"\x01NOOP")[0] == 200
    assert r.cmd(b"SI" + IAC + IP + b"TE EXEC /bin/sh")[0] == 502     # still the table's SITE
    # IAC eats the CR: what is left holds a bare LF, refused whole
    r.send(b"RETR a.txt" + IAC + b"\r\nDELE important.txt\r\n")
    code, lines = r.reply()
    assert code == 501, lines
    # IAC WILL eats the LF as its option byte: one line, one (harmless) command
    r.send(b"DELE a.txt" + IAC + WILL + b"\nDELE important.txt\r\n")
    code, lines = r.reply()
    assert code == 550, lines                     # 'a.txtDELE important.txt' does not exist
    # a subnegotiation swallows what it holds, never runs it
    r.send(IAC + SB + b"DELE important.txt\r\n" + IAC + SE + b"NOOP\r\n")
    assert r.reply()[0] == 200
    assert r.cmd("NOOP")[0] == 200
    assert server_file(ftpd, "important.txt") == b"keep me\n"


def test_long_lines_and_split_segments(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    # 200 KB without CRLF, in small segments, then the CRLF: one 500
    for _ in range(200):
        r.send(b"B" * 1024)
    r.send(b"\r\n")
    code, lines = r.reply()
    assert code == 500, lines
    assert r.cmd("NOOP")[0] == 200
    # a long line whose CR and LF arrive apart
    r.send(b"NOOP " + b"C" * 3000 + b"\r")
    time.sleep(0.2)
    r.send(b"\nNOOP\r\n")
    assert r.reply()[0] == 500 and r.reply()[0] == 200
    # a command split across TCP segments, CR and LF apart
    r.cmd("TYPE I")
    port = r.pasv_port()
    for piece in (b"RE", b"TR hel", b"lo.txt\r", b"\n"):
        r.send(piece)
        time.sleep(0.15)
    assert r.reply()[0] == 150
    assert recv_all(r.data_connect(port)) == b"hello\nworld\n"
    assert r.reply()[0] == 226
    # a line of exactly the limit is a command, not 'too long'
    code, lines = r.cmd(b"SIZE " + b"n" * (2048 - 5))
    assert code in (550, 501), lines


def test_non_utf8_names_infected_and_quarantined(proxy, ftpd, tmp_path):
    """Names that are not UTF-8 go through the scan, the refusal, the
    quarantine record and the log without a crash."""
    hp = proxy("action = quarantine\n")
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    name = b"bad-\x80\xc3\x28-\xe9.com"
    port = r.pasv_port()
    r.send(b"STOR " + name + b"\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    d.sendall(EICAR)
    d.close()
    code, lines = r.reply()
    assert code == 551 and EICAR_NAME in "\n".join(lines), lines
    assert any("Quarantined as" in l for l in lines)
    no_traceback(lines)
    assert not [n for n in os.listdir(ftpd.root) if n.startswith("bad-")]
    code, lines = r.cmd(b"RNFR " + name)
    assert code in (350, 550), lines
    assert r.cmd("NOOP")[0] == 200
    wait_until(lambda: "command=STOR" in log_text(tmp_path), timeout=10, what="log line")


# -- login smuggling ---------------------------------------------------------------------

OUTSIDE_TARGETS = [
    "127.0.0.1:{p}", "0.0.0.0:{p}", "0:{p}", "[::]:{p}", "[::1]:{p}",
    "[::ffff:127.0.0.1]:{p}", "[::ffff:7f00:1]:{p}", "[::127.0.0.1]:{p}",
    "2130706433:{p}", "0x7f000001:{p}", "0x7f.1:{p}", "127.1:{p}", "0177.0.0.1:{p}",
    "localhost:{p}", "localhost.:{p}", "LOCALHOST:{p}", "127.0.0.2:{p}",
    "evil@127.0.0.1:{p}", "127.0.0.1:{p}@127.0.0.1:{p}", "[127.0.0.1]:{p}",
    "127.0.0.1:0{p}",
]


def test_userhost_outside_client_never_reaches_loopback(proxy, tmp_path):
    """inside = 127.0.0.1/32, the client at 127.0.0.2 is outside, and the
    administrator allows every address and name on the server's port: no
    spelling of a loopback address reaches the server (it counts its
    connections)."""
    srv = HostileFtpd()
    try:
        p = srv.port
        hp = proxy("allowed_upstreams = 0.0.0.0/0:%d, ::/0:%d, *:%d\n"
                   "[networks]\ninside = 127.0.0.1/32\n" % (p, p, p), upstream="userhost")
        for target in OUTSIDE_TARGETS:
            t = target.format(p=p)
            r = Raw(*hp, source="127.0.0.2")
            assert r.reply()[0] == 220
            code, lines = r.cmd("USER user@" + t)
            assert code in (501, 530), (t, lines)
            no_traceback(lines)
            r.close()
        time.sleep(0.3)
        assert srv.connections == [], srv.seen
    finally:
        srv.stop()


def test_userhost_at_tricks_from_inside(proxy):
    """An inside client: the split is at the last '@', the rest of the name
    is relayed as it was, and a target not allowed is never connected."""
    srv = HostileFtpd()
    try:
        p = srv.port
        hp = proxy("allowed_upstreams = 127.0.0.1:%d\n[networks]\ninside = 127.0.0.1/32\n" % p,
                   upstream="userhost")
        for t in ("u@127.0.0.1:%d@127.0.0.2:%d" % (p, p), "u@127.0.0.1", "u@127.0.0.1:%d " % p,
                  "u@127.0.0.1:%d:21" % p, "u@127.0.0.1:+%d" % p, "u@[127.0.0.1]:%d" % p,
                  "u@127.0.0.1:%d\0" % p, "u@127.0.0.1:%d\rPASS x" % p, "u@"):
            r = Raw(*hp)
            r.reply()
            code, lines = r.cmd(b"USER " + t.encode())
            assert code in (501, 530), (t, lines)
            r.close()
        time.sleep(0.3)
        assert srv.connections == []
        r = Raw(*hp)
        r.reply()
        assert r.cmd("USER evil@127.0.0.2@127.0.0.1:%d" % p)[0] == 331
        assert r.cmd("PASS x")[0] == 230
        assert b"USER evil@127.0.0.2" in srv.seen
        r.close()
    finally:
        srv.stop()


# -- transfers --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["passive", "active"])
def test_upload_reset_after_all_data_never_forwarded(proxy, ftpd, mode):
    """The whole file arrives, then a reset instead of a FIN: never stored."""
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    name = "reset-%s.bin" % mode
    if mode == "passive":
        port = r.pasv_port()
    else:
        lst, lport = listener()
        assert r.cmd("PORT " + port_arg("127.0.0.1", lport))[0] == 200
    r.send("STOR %s\r\n" % name)
    assert r.reply()[0] == 150
    d = r.data_connect(port) if mode == "passive" else lst.accept()[0]
    d.sendall(CLEAN)
    time.sleep(0.3)
    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    d.close()
    code, lines = r.reply()
    assert code == 426, lines
    assert server_file(ftpd, name) is None
    assert r.cmd("NOOP")[0] == 200


@pytest.fixture(scope="module")
def bigfile(ftpd):
    name = "attack-big.bin"
    with open(os.path.join(ftpd.root, name), "wb") as f:
        f.write(os.urandom(16 << 20))
    return name


def test_abor_inband_mid_download_order(proxy, bigfile):
    """ABOR in band while the client is not reading: 426 for the transfer,
    then 226 for the ABOR, nothing in between, and the session goes on."""
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send("RETR %s\r\n" % bigfile)
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    assert d.recv(65536)
    r.send("ABOR\r\n")
    code1, l1 = r.reply()
    code2, l2 = r.reply()
    assert (code1, code2) == (426, 226), (l1, l2)
    got = recv_all(d)
    assert len(got) < 16 << 20                       # the transfer was cut
    assert r.cmd("NOOP")[0] == 200


def _trickle(data, delay=0.25, piece=8):
    """A RETR script that sends data slowly and honours ABOR."""
    def script(c, name):
        c.send(b"150 trickling\r\n")
        d = c.accept_data()
        for i in range(0, len(data), piece):
            try:
                d.sendall(data[i:i + piece])
            except OSError:
                break
            line = c.readline(timeout=delay)
            if line is not None and line.upper().endswith(b"ABOR"):
                d.close()
                c.send(b"426 aborted\r\n226 ABOR ok\r\n")
                return True
        d.close()
        c.send(b"226 done\r\n")
        return True
    return script


def test_abor_during_slow_fetch(proxy):
    """ABOR while the proxy is still fetching from a slow server: 426 then
    226 to the client, ABOR to the server, the session goes on."""
    srv = HostileFtpd(on_retr=_trickle(b"z" * 400))
    try:
        hp = hostile_proxy(proxy, srv)
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        r.pasv_port()
        r.send("RETR slow.bin\r\n")
        time.sleep(1.0)
        r.send("ABOR\r\n")
        code1, l1 = r.reply()
        code2, l2 = r.reply()
        assert (code1, code2) == (426, 226), (l1, l2)
        assert r.cmd("NOOP")[0] == 200
        assert any(l.upper() == b"ABOR" for l in srv.seen)
    finally:
        srv.stop()


def test_progress_slow_fetch_of_infected_file(proxy):
    """progress = yes and a server that takes seconds to send EICAR: '150-'
    keep-alives ending in '150 ', then 451 naming the virus, and the
    client's data port is never connected."""
    srv = HostileFtpd(on_retr=_trickle(EICAR, delay=0.3, piece=8))
    try:
        hp = hostile_proxy(proxy, srv, "progress = yes\nprogress_interval = 1\n")
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        lst, port = listener()
        assert r.cmd("PORT " + port_arg("127.0.0.1", port))[0] == 200
        r.send("RETR slow-eicar.com\r\n")
        code, lines = r.reply()
        assert code == 150 and lines[0].startswith("150-") and lines[-1].startswith("150 "), \
            lines
        code, lines = r.reply()
        assert code == 451 and EICAR_NAME in "\n".join(lines), lines
        lst.settimeout(0.5)
        with pytest.raises(socket.timeout):
            lst.accept()
        lst.close()
        assert r.cmd("NOOP")[0] == 200
    finally:
        srv.stop()


def test_b36_fragment_variations(proxy, ftpd):
    hp = proxy()
    f = client(hp)
    f.voidcmd("TYPE I")
    a, b, c = EICAR[:20], EICAR[20:44], EICAR[44:]
    name = "frag3.com"
    assert f.storbinary("STOR " + name, io.BytesIO(a)).startswith("226")
    assert f.storbinary("APPE " + name, io.BytesIO(b)).startswith("226")    # a+b is clean
    with pytest.raises(ftplib.error_perm) as e:                             # a+b+c is not
        f.storbinary("APPE " + name, io.BytesIO(c))
    assert str(e.value).startswith("551") and EICAR_NAME in str(e.value)
    assert server_file(ftpd, name) == a + b
    # REST survives other commands and a new PASV: still refused for STOR
    assert f.sendcmd("REST 44").startswith("350")
    f.voidcmd("NOOP")
    f.sendcmd("PWD")
    with pytest.raises(ftplib.error_perm):
        f.storbinary("STOR " + name, io.BytesIO(c))
    assert server_file(ftpd, name) == a + b
    # REST then STOU: refused too
    f.sendcmd("REST 44")
    with pytest.raises(ftplib.error_perm):
        f.sendcmd("STOU")
    # REST 0 is no restart: a whole clean STOR works
    assert f.sendcmd("REST 0").startswith("350")
    assert f.storbinary("STOR " + name, io.BytesIO(b"whole and clean")).startswith("226")
    assert server_file(ftpd, name) == b"whole and clean"


def test_b36_appe_race_between_sessions(proxy, ftpd):
    """Session A starts APPE: the proxy fetches the (clean) file and says
    150.  Before A sends its bytes, session B replaces the file with the
    first half of EICAR (clean alone).  A then sends the second half: the
    proxy scanned 'old + half 2' (clean) but the server appends to 'half 1':
    EICAR is stored.  The server must only ever store what was scanned."""
    hp = proxy()
    name = "race.com"
    with open(os.path.join(ftpd.root, name), "wb") as fh:
        fh.write(b"X" * 34)
    ra = Raw(*hp)
    ra.login()
    ra.cmd("TYPE I")
    port = ra.pasv_port()
    ra.send("APPE %s\r\n" % name)
    assert ra.reply()[0] == 150
    fb = client(hp)
    assert fb.storbinary("STOR " + name, io.BytesIO(EICAR[:34])).startswith("226")
    fb.quit()
    d = ra.data_connect(port)
    d.sendall(EICAR[34:])
    d.close()
    code, lines = ra.reply()
    assert server_file(ftpd, name) != EICAR, (code, lines)


def test_rest_edges(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    size = len(b"hello\nworld\n")
    port = r.pasv_port()
    assert r.cmd("REST %d" % size)[0] == 350                # exactly the size: no bytes
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    assert recv_all(r.data_connect(port)) == b""
    assert r.reply()[0] == 226
    for offset, want in ((size + 1, 554), (10 ** 17, 554)):
        r.pasv_port()
        assert r.cmd("REST %d" % offset)[0] == 350
        code, lines = r.cmd("RETR hello.txt")
        assert code == want, (offset, lines)
    for bad in ("REST -1", "REST 1e3", "REST 0x10", "REST " + "9" * 40, "REST 12 34"):
        code, lines = r.cmd(bad)
        assert code == 501, (bad, lines)
    # REST beyond the size of an infected file: the virus is still named
    r.pasv_port()
    assert r.cmd("REST 99999")[0] == 350
    code, lines = r.cmd("RETR eicar.com")
    assert code == 550 and EICAR_NAME in "\n".join(lines), lines
    assert r.cmd("NOOP")[0] == 200


def _zip(payload, method=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method) as z:
        z.writestr("readme.com", payload)
    return buf.getvalue()


DISGUISED = {
    "zip-stored": lambda: _zip(EICAR),
    "zip-deflated": lambda: _zip(EICAR * 20, zipfile.ZIP_DEFLATED),
    "gzip": lambda: gzip.compress(EICAR * 20),
    "zip-after-text": lambda: b"Just a note.\n" * 60 + _zip(EICAR * 20, zipfile.ZIP_DEFLATED),
}


@pytest.mark.parametrize("kind", sorted(DISGUISED))
def test_skip_extensions_do_not_skip_archives(proxy, ftpd, clamd, tmp_path, kind):
    """skip_extensions = .txt; content that clamd finds EICAR in, in an
    archive named .txt: scanned and refused, never stored."""
    from scanlib.scanner import Scanner
    from scanlib.verdict import Infected
    data = DISGUISED[kind]()
    probe = os.path.join(str(tmp_path), "probe")
    with open(probe, "wb") as fh:
        fh.write(data)
    v = Scanner(endpoints=clamd.endpoints, timeout=20).scan_file(open(probe, "rb"))
    if not isinstance(v, Infected):
        pytest.skip("clamd does not find EICAR in %s itself: %r" % (kind, v))
    hp = proxy("skip_extensions = .txt\n")
    f = client(hp)
    name = "notes-%s.txt" % kind
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR " + name, io.BytesIO(data))
    assert str(e.value).startswith("551") and EICAR_NAME in str(e.value)
    assert server_file(ftpd, name) is None


@pytest.mark.parametrize("how,up,down", [("tempfail", 451, 451), ("reject", 550, 550),
                                         ("pass", 226, 226)])
def test_scanner_down_on_unavailable(tmp_path, ftpd, how, up, down):
    """clamd unreachable: the configured on_unavailable reply, and nothing
    forwarded unless it says pass (no data connection to the client either)."""
    text = ("[scanner]\nclamd = unix:%s/none.sock\ntimeout = 5\nconnect_timeout = 1\n"
            "on_unavailable = %s\n[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %s\n"
            % (tmp_path, how, ftpd.port, passive_range()))
    conf = write_config(tmp_path, text)
    with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
        f = client(hp)
        name = "down-%s.bin" % how
        try:
            resp = f.storbinary("STOR " + name, io.BytesIO(b"data while clamd is down"))
        except ftplib.Error as e:
            resp = str(e)
        assert int(resp[:3]) == up, resp
        assert (server_file(ftpd, name) is not None) == (how == "pass")
        f.set_pasv(False)
        got = []
        try:
            resp = f.retrbinary("RETR hello.txt", got.append)
        except ftplib.Error as e:
            resp = str(e)
        assert int(resp[:3]) == down, resp
        assert (b"".join(got) == b"hello\nworld\n") == (how == "pass")
        f.quit()


def test_scanner_that_hangs_forwards_nothing(tmp_path, ftpd):
    """A clamd that accepts and never answers: after the scanner timeout,
    451, nothing stored."""
    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(16)
    text = ("[scanner]\nclamd = tcp:127.0.0.1:%d\ntimeout = 2\nconnect_timeout = 1\n"
            "[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %s\n"
            % (hang.getsockname()[1], ftpd.port, passive_range()))
    conf = write_config(tmp_path, text)
    try:
        with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
            f = client(hp)
            with pytest.raises(ftplib.error_temp) as e:
                f.storbinary("STOR hang.bin", io.BytesIO(b"never scanned"))
            assert str(e.value).startswith("451")
            assert server_file(ftpd, "hang.bin") is None
            f.quit()
    finally:
        hang.close()


# -- the bytes served are not the bytes scanned ------------------------------------------

def test_rest_serves_a_suffix_that_a_hash_signature_knows(proxy, ftpd):
    """clamd's hash signatures (most of a real database) name whole files.
    'junk + known file' is clean as a whole; REST past the junk serves
    exactly the known file.  What the client receives must be what was
    judged: the served part is scanned too (or the RETR refused)."""
    from tests.rig.clamd import hash_sample, HASH_NAME
    sample = hash_sample()
    with open(os.path.join(ftpd.root, "hashed.bin"), "wb") as fh:
        fh.write(sample)
    with open(os.path.join(ftpd.root, "padded.bin"), "wb") as fh:
        fh.write(b"P" * 100 + sample)
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    r.pasv_port()
    code, lines = r.cmd("RETR hashed.bin")                  # the signature works here
    assert code == 550 and HASH_NAME in "\n".join(lines), lines
    port = r.pasv_port()
    assert r.cmd("REST 100")[0] == 350
    r.send("RETR padded.bin\r\n")
    code, lines = r.reply()
    got = b""
    if code == 150:
        got = recv_all(r.data_connect(port))
        r.reply()
    assert got != sample, "the known file was served from offset 100"


CRLF_TEXT = b"@echo off\r\nrem virusgw attack sample\r\ndel /q C:\\important\r\n"
CRLF_NAME = "VirusGW.Attack.CRLF.UNOFFICIAL"


@pytest.fixture(scope="module")
def clamd_crlf(tmp_path_factory):
    """A private clamd whose database also knows CRLF_TEXT by its hash
    (the way real databases know Windows scripts, CRLF line ends and all)."""
    import hashlib
    import shutil
    from tests.rig import clamd as rig
    if not rig.clamd_binary():
        pytest.skip("clamd is not installed")
    sigs = str(tmp_path_factory.mktemp("crlf-sigs"))
    for n in os.listdir(rig.SIGS):
        shutil.copy(os.path.join(rig.SIGS, n), sigs)
    with open(os.path.join(sigs, "attack.hsb"), "w") as fh:
        fh.write("%s:%d:VirusGW.Attack.CRLF\n" % (hashlib.sha256(CRLF_TEXT).hexdigest(),
                                                   len(CRLF_TEXT)))
    c = rig.Clamd(str(tmp_path_factory.mktemp("clamd-crlf")), sigs=sigs)
    c.start()
    yield c
    c.stop()


def test_ascii_conversion_serves_bytes_never_scanned(proxy, ftpd, clamd_crlf):
    """The server stores the LF form (clean); a TYPE A download gets the
    CRLF form, which the scanner knows.  The client must not receive it."""
    with open(os.path.join(ftpd.root, "script.txt"), "wb") as fh:
        fh.write(CRLF_TEXT.replace(b"\r\n", b"\n"))
    hp = proxy(scanner=clamd_crlf.endpoints)
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    with open(os.path.join(ftpd.root, "crlf.bat"), "wb") as fh:
        fh.write(CRLF_TEXT)
    code, lines = r.cmd("RETR crlf.bat")                    # the signature works here
    assert code == 550 and CRLF_NAME in "\n".join(lines), lines
    assert r.cmd("TYPE A")[0] == 200
    port = r.pasv_port()
    r.send("RETR script.txt\r\n")
    code, lines = r.reply()
    got = b""
    if code == 150:
        got = recv_all(r.data_connect(port))
        r.reply()
    assert got != CRLF_TEXT, "the CRLF form was served unscanned"


# -- policy bypasses -------------------------------------------------------------------

def test_skip_extensions_rename_to_a_scanned_name(proxy, ftpd):
    """skip_extensions = .txt lets 'note.txt' pass unscanned (the patent's
    rule), but then RNTO 'note.com' puts unscanned content on the server
    under a name that the rule says is always scanned.  Right: the rename
    is refused (or the file scanned first)."""
    hp = proxy("skip_extensions = .txt\n")
    f = client(hp)
    assert f.storbinary("STOR note.txt", io.BytesIO(EICAR)).startswith("226")
    try:
        f.sendcmd("RNFR note.txt")
        f.sendcmd("RNTO note.com")
    except ftplib.Error as e:
        assert str(e).startswith("553"), e          # the rule: refused with 553
    assert server_file(ftpd, "note.com") is None
    # within the skipped extensions a rename is fine
    assert f.sendcmd("RNFR note.txt").startswith("350")
    assert f.sendcmd("RNTO renamed.TXT").startswith("250")
    assert server_file(ftpd, "renamed.TXT") == EICAR


def test_oversized_upload_is_not_spooled_without_end(clamd, ftpd, tmp_path):
    """max_size = 1 MiB and on_unscannable = reject: the file will be
    refused whatever it holds, so the proxy has no reason to spool more
    than max_size of it.  A client pushing 96 MiB must be cut off well
    before the end (the spool is a shared disk)."""
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\nmax_size = 1048576\n"
                        "on_unscannable = reject\n[smtp]\nmax_message_size = 1048576\n"
                        "[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %s\n"
                        % (", ".join(clamd.endpoints), ftpd.port, passive_range()))
    with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
        _push_oversized(hp, ftpd)


def _push_oversized(hp, ftpd):
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send("STOR huge.bin\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    total, block = 96 << 20, b"\0" * (1 << 20)
    sent = 0
    try:
        while sent < total:
            d.sendall(block)
            sent += len(block)
        d.close()
    except OSError:
        pass
    code, lines = r.reply()
    assert code in (552, 426, 451) and server_file(ftpd, "huge.bin") is None, lines
    assert sent < total, "all %d MiB were taken into the spool" % (total >> 20)


# -- the same rules on IPv6 and dual-stack fronts ------------------------------------------

def test_ipv6_client_bounce_rules(proxy):
    """A client on ::1: IPv4 forms of PORT/EPRT are another protocol (522,
    or 500/501), another IPv6 host is refused, its own address works."""
    hp = proxy(host="::1")
    r = Raw("::1", hp[1])
    r.login()
    r.cmd("TYPE I")
    for line, codes in (("EPRT |1|127.0.0.1|5000|", {500, 522}),
                        ("PORT 127,0,0,1,19,136", {500, 501, 522}),
                        ("EPRT |2|::2|5000|", {500}),
                        ("EPRT |2|::1|80|", {500}),
                        ("EPRT |2|::ffff:127.0.0.1|5000|", {500, 522})):
        code, lines = r.cmd(line)
        assert code in codes, (line, lines)
    lst = socket.socket(socket.AF_INET6)
    lst.bind(("::1", 0))
    lst.listen(1)
    lst.settimeout(10)
    assert r.cmd("EPRT |2|::1|%d|" % lst.getsockname()[1])[0] == 200
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    conn, _ = lst.accept()
    assert recv_all(conn) == b"hello\nworld\n"
    assert r.reply()[0] == 226
    lst.close()


def test_dual_stack_front_keeps_the_rules(proxy):
    """A dual-stack [::] listener reached over IPv4 sees the client as
    ::ffff:127.0.0.1: bounce refusals and passive-port ownership still
    work on the normalised address."""
    other = Trap("127.0.0.2")
    try:
        hp = proxy(host="::")
        r = Raw("127.0.0.1", hp[1])
        r.login()
        r.cmd("TYPE I")
        assert r.cmd("PORT " + port_arg("127.0.0.2", other.port))[0] == 500
        assert r.cmd("EPRT |2|::ffff:127.0.0.2|%d|" % other.port)[0] in (500, 522)
        code, lines = r.cmd("PASV")
        assert code == 227 and "(127,0,0,1," in lines[-1], lines
        nums = lines[-1].split("(")[1].split(")")[0].split(",")
        port = int(nums[4]) * 256 + int(nums[5])
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        r.send("RETR hello.txt\r\n")
        assert r.reply()[0] == 150
        assert recv_all(s) == b""
        assert recv_all(r.data_connect(port)) == b"hello\nworld\n"
        assert r.reply()[0] == 226
        assert other.hits == []
    finally:
        other.close()


def test_hostile_server_text_never_raw_in_the_log(proxy, tmp_path):
    """A server that greets with 421 and control bytes in its text: the
    client gets a clean 421, and the log holds the text escaped (no ESC,
    NUL or CR from the network in the log file)."""
    srv = HostileFtpd(replies={"GREETING": b"421 go \x1b[2J away\x00 \r forged=yes\r\n"})
    try:
        hp = hostile_proxy(proxy, srv)
        r = Raw(*hp)
        assert r.reply()[0] == 220
        code, lines = r.cmd("USER u")
        assert code == 421, lines
        assert not any(c in "\n".join(lines) for c in "\x00\r")
        r.close()
        wait_until(lambda: "event=session" in log_text(tmp_path), timeout=10, what="log")
        with open(os.path.join(str(tmp_path), "virusgw.log"), "rb") as fh:
            raw = fh.read()
        assert b"\x1b" not in raw and b"\x00" not in raw and b"\r" not in raw, raw[-500:]
    finally:
        srv.stop()


def test_abor_during_upload_scan_never_forwarded(proxy, ftpd, clamd):
    """The whole upload has arrived and the (slow) scan runs when ABOR
    comes: 426 then 226, and the file never reaches the server."""
    from tests.test_ftp_proxy import SlowClamd
    slow = SlowClamd(clamd.tcp_port, 4)
    try:
        hp = proxy(scanner=["tcp:127.0.0.1:%d" % slow.port])
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        port = r.pasv_port()
        r.send("STOR abor-scan.bin\r\n")
        assert r.reply()[0] == 150
        d = r.data_connect(port)
        d.sendall(CLEAN)
        d.close()
        time.sleep(1.0)                        # received; now waiting for the scanner
        r.send("ABOR\r\n")
        code1, l1 = r.reply()
        code2, l2 = r.reply()
        assert (code1, code2) == (426, 226), (l1, l2)
        assert r.cmd("NOOP")[0] == 200
        assert server_file(ftpd, "abor-scan.bin") is None
    finally:
        slow.close()


def test_skip_extensions_appe_archive_to_text(proxy, ftpd, clamd, tmp_path):
    """skip_extensions = .txt: a text file is stored, then a zip holding
    EICAR is APPEnded to it.  The stored whole holds an archive (clamd
    finds EICAR in it): it must be scanned and the APPE refused."""
    from scanlib.scanner import Scanner
    from scanlib.verdict import Infected
    text = b"Just a note.\n" * 60
    archive = _zip(EICAR * 20, zipfile.ZIP_DEFLATED)
    probe = os.path.join(str(tmp_path), "probe")
    with open(probe, "wb") as fh:
        fh.write(text + archive)
    assert isinstance(Scanner(endpoints=clamd.endpoints, timeout=20).scan_file(probe), Infected)
    hp = proxy("skip_extensions = .txt\n")
    f = client(hp)
    assert f.storbinary("STOR grow.txt", io.BytesIO(text)).startswith("226")
    try:
        f.storbinary("APPE grow.txt", io.BytesIO(archive))
    except ftplib.Error:
        pass
    assert server_file(ftpd, "grow.txt") == text


# -- hostile arguments for every control-only verb (hypothesis) -----------------------------

HOSTILE_VERBS = ["USER", "PASS", "ACCT", "NOOP", "FEAT", "TYPE", "MODE", "STRU", "ALLO",
                 "REST", "ABOR", "OPTS", "PORT", "EPRT", "CWD", "CDUP", "PWD", "MKD", "RMD",
                 "RNFR", "SIZE", "MDTM", "MLST", "SYST", "STAT", "HELP", "SITE", "AUTH",
                 "PROT", "LPRT", "REIN", "SMNT", "XPWD", "BOGUS", "rest", "Type"]


def test_hostile_arguments_never_break_the_session(proxy):
    """Every control-only verb with arbitrary argument bytes (no CR, LF or
    IAC): one proper reply each, never 421, never a traceback, and the
    session stays in step."""
    from hypothesis import given, settings, strategies as st, HealthCheck
    hp = proxy()
    r = Raw(*hp)
    r.login()
    args = st.binary(max_size=300).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\xff", b""))

    @settings(max_examples=150, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(verb=st.sampled_from(HOSTILE_VERBS), arg=args, sep=st.sampled_from([b" ", b"  ", b""]))
    def one(verb, arg, sep):
        line = verb.encode() + (sep + arg if sep else b"")
        code, lines = r.cmd(line)
        assert 200 <= code < 600 and code != 421, (line, lines)
        no_traceback(lines)

    one()
    assert r.cmd("NOOP")[0] == 200


def _stor_with_extra_reply(c, name):
    c.send(b"150 send it\r\n")
    data = recv_all(c.accept_data())
    c.server.files[name] = data
    c.send(b"226 stored\r\n226 unsolicited: stored again\r\n")


def test_unsolicited_server_reply_never_becomes_a_226(proxy):
    """A server sends one reply too many.  Whatever the proxy does with it
    (drop it, or end the session with 421), a client must never hear 2xx
    for an upload that the server did not receive."""
    srv = HostileFtpd(on_stor=_stor_with_extra_reply)
    try:
        hp = hostile_proxy(proxy, srv)
        f = client(hp)
        assert f.storbinary("STOR a.bin", io.BytesIO(b"first")).startswith("226")
        try:
            resp = f.storbinary("STOR b.bin", io.BytesIO(b"second"))
        except (ftplib.Error, EOFError, OSError) as e:
            resp = str(e)
        assert not resp.startswith("2") or srv.files.get(b"b.bin") == b"second", resp
    finally:
        srv.stop()


def test_client_vanishes_during_upload_scan(proxy, ftpd, clamd, tmp_path):
    """The client resets its control connection while its upload is being
    scanned: nothing reaches the server, the spool is emptied (checked by
    no_leftovers) and the session is logged as gone."""
    from tests.test_ftp_proxy import SlowClamd
    slow = SlowClamd(clamd.tcp_port, 3)
    try:
        hp = proxy(scanner=["tcp:127.0.0.1:%d" % slow.port])
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        port = r.pasv_port()
        r.send("STOR vanished.bin\r\n")
        assert r.reply()[0] == 150
        d = r.data_connect(port)
        d.sendall(CLEAN)
        d.close()
        time.sleep(0.5)
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        r.close()
        wait_until(lambda: "event=session" in log_text(tmp_path), timeout=15, what="session end")
        # the session line is the proxy's last act: nothing can follow it
        assert server_file(ftpd, "vanished.bin") is None
    finally:
        slow.close()
