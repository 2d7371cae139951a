"""The FTP proxy end to end: real socket activation (systemd-socket-activate
--inetd), the real clamd fixture, a real pyftpdlib server, ftplib and raw
control connections.  Every FTP case of tests/cases (B29 B32 B34 B36) is
here with its expected outcome."""

import contextlib
import ftplib
import io
import json
import os
import random
import re
import socket
import time

import pytest

from tests.rig.activate import activated, proxy_argv, write_config, wait_until
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.ftp import PyFtpd, Raw, recv_all

CLEAN = b"clean content\n" * 1000


def passive_range():
    base = random.randrange(32000, 34800)
    return "%d-%d" % (base, base + 99)


@pytest.fixture(scope="module")
def ftpd(tmp_path_factory):
    root = tmp_path_factory.mktemp("ftproot")
    with open(os.path.join(str(root), "hello.txt"), "wb") as f:
        f.write(b"hello\nworld\n")
    with open(os.path.join(str(root), "eicar.com"), "wb") as f:
        f.write(EICAR)
    with open(os.path.join(str(root), "clean.bin"), "wb") as f:
        f.write(CLEAN)
    with open(os.path.join(str(root), "important.txt"), "wb") as f:
        f.write(b"keep me\n")
    with PyFtpd(root) as s:
        yield s


@pytest.fixture
def proxy(tmp_path, clamd, ftpd):
    """proxy(extra_config, host=..., upstream=...) -> (host, port); the
    config file's directory is tmp_path (log: tmp_path/virusgw.log)."""
    stack = contextlib.ExitStack()

    def make(extra="", host="127.0.0.1", upstream=None, scanner=None, top=""):
        text = top + "[scanner]\nclamd = %s\ntimeout = 20\n%s" % (
            ", ".join(scanner or clamd.endpoints), "")
        if "[networks]" not in extra:
            text += "[networks]\ninside = 10.0.0.0/8\n"
        defaults = {"upstream": upstream or "tcp:127.0.0.1:%d" % ftpd.port,
                    "passive_ports": passive_range(), "timeout": "30", "data_timeout": "10"}
        text += "[ftp]\n" + "".join("%s = %s\n" % (k, v) for k, v in defaults.items()
                                    if not re.search(r"^%s\s*=" % k, extra, re.M))
        conf = write_config(tmp_path, text + extra)
        return stack.enter_context(activated(proxy_argv("virusgw-ftpproxy", conf), host=host))
    yield make
    stack.close()


def client(hp, user="user", password="secret", source=None):
    f = ftplib.FTP()
    if source:
        f.source_address = (source, 0)
    f.connect(hp[0], hp[1], timeout=20)
    f.login(user, password)
    return f


def server_file(ftpd, name):
    p = os.path.join(ftpd.root, name)
    return open(p, "rb").read() if os.path.exists(p) else None


def log_text(tmp_path):
    p = os.path.join(str(tmp_path), "virusgw.log")
    return open(p).read() if os.path.exists(p) else ""


# -- basic transfers ------------------------------------------------------------

@pytest.mark.parametrize("passive", [True, False])
def test_clean_binary_up_and_down(proxy, ftpd, passive, tmp_path):
    hp = proxy()
    f = client(hp)
    f.set_pasv(passive)
    data = os.urandom(300000)
    name = "up-%s.bin" % passive
    resp = f.storbinary("STOR " + name, io.BytesIO(data))
    assert resp.startswith("226"), resp
    assert server_file(ftpd, name) == data
    out = io.BytesIO()
    resp = f.retrbinary("RETR " + name, out.write)
    assert resp.startswith("226") and out.getvalue() == data
    f.quit()
    log = log_text(tmp_path)
    assert "command=STOR" in log and "command=RETR" in log and "verdict=clean" in log
    wait_until(lambda: "event=session" in log_text(tmp_path), timeout=10,
               what="the session summary line")
    assert "secret" not in log                       # PASS is never logged


def test_greeting_and_finding_echoed(proxy):
    hp = proxy()
    r = Raw(*hp)
    code, lines = r.reply()
    assert code == 220 and "virusgw" in lines[0]
    assert r.cmd("USER user")[0] == 331
    assert r.cmd("PASS secret")[0] == 230
    assert r.cmd("TYPE I")[0] == 200
    port = r.pasv_port()
    r.send("RETR clean.bin\r\n")
    code, lines = r.reply()
    assert code == 150
    body = recv_all(r.data_connect(port))
    code, lines = r.reply()
    assert code == 226 and body == CLEAN
    assert lines[0] == "226-virusgw: clean.bin: OK"      # the scanner's finding
    assert r.cmd("QUIT")[0] == 221


@pytest.mark.parametrize("passive", [True, False])
def test_infected_download_refused(proxy, passive):
    hp = proxy()
    f = client(hp)
    f.set_pasv(passive)
    got = []
    with pytest.raises(ftplib.error_perm) as e:
        f.retrbinary("RETR eicar.com", got.append)
    text = str(e.value)
    assert text.startswith("550") and EICAR_NAME in text
    assert got == []
    assert f.voidcmd("NOOP").startswith("200")      # the session goes on


def test_infected_upload_refused_and_quarantined(proxy, ftpd, tmp_path):
    hp = proxy("action = quarantine\n")
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR virus-up.com", io.BytesIO(EICAR))
    text = str(e.value)
    assert text.startswith("551") and EICAR_NAME in text and "Quarantined as" in text
    assert server_file(ftpd, "virus-up.com") is None
    qid = text.split("Quarantined as ")[1].split()[0]
    qdir = os.path.join(str(tmp_path), "quarantine", qid)
    with open(os.path.join(qdir, "content"), "rb") as c:
        assert c.read() == EICAR
    with open(os.path.join(qdir, "meta.json")) as m:
        meta = json.load(m)
    assert meta["protocol"] == "ftp" and meta["ftp_path"] == "virus-up.com"
    assert EICAR_NAME in meta["viruses"] and meta["ftp_user"] == "user"
    wait_until(lambda: "qid=%s" % qid in log_text(tmp_path), timeout=10, what="log line")


def test_infected_download_quarantine_names_entry(proxy, tmp_path):
    hp = proxy("action = quarantine\n")
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.retrbinary("RETR eicar.com", lambda b: None)
    qid = str(e.value).split("Quarantined as ")[1].split()[0]
    assert os.path.isdir(os.path.join(str(tmp_path), "quarantine", qid))


def test_action_pass_delivers_with_finding(proxy):
    hp = proxy("action = pass\n")
    f = client(hp)
    out = io.BytesIO()
    resp = f.retrbinary("RETR eicar.com", out.write)
    assert out.getvalue() == EICAR
    assert resp.startswith("226") and EICAR_NAME in resp and "passed by policy" in resp


def test_ascii_mode_conversion(proxy, ftpd):
    hp = proxy()
    f = client(hp)
    f.storlines("STOR lines.txt", io.BytesIO(b"one\ntwo\nthree\n"))   # sent as CRLF
    assert server_file(ftpd, "lines.txt") == b"one\ntwo\nthree\n"
    got = []
    f.retrlines("RETR hello.txt", got.append)
    assert got == ["hello", "world"]
    # the raw bytes a TYPE A client sees are CRLF
    f.voidcmd("TYPE A")
    conn = f.transfercmd("RETR hello.txt")
    assert recv_all(conn) == b"hello\r\nworld\r\n"
    f.voidresp()


def test_infected_ascii_upload_refused(proxy, ftpd):
    hp = proxy()
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.storlines("STOR ascii-eicar.txt", io.BytesIO(EICAR + b"\n"))
    assert str(e.value).startswith("551")
    assert server_file(ftpd, "ascii-eicar.txt") is None


def test_listings_relayed(proxy):
    hp = proxy()
    f = client(hp)
    assert "hello.txt" in f.nlst()
    lines = []
    f.retrlines("LIST", lines.append)
    assert any("clean.bin" in l for l in lines)
    assert "eicar.com" in [name for name, facts in f.mlsd()]


def test_feat_filtered_and_refusals(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    code, lines = r.cmd("FEAT")
    feats = {l.strip().split(" ")[0] for l in lines[1:-1]}
    assert code == 211 and {"EPSV", "EPRT", "PASV", "REST"} <= feats
    assert "AUTH" not in feats and "PROT" not in feats and "MODE" not in feats
    for line, want in [("AUTH TLS", 502), ("PROT P", 502), ("MODE B", 504), ("STRU R", 504),
                       ("SITE EXEC /bin/sh", 502), ("STOU", 502), ("BOGUS x", 500),
                       ("SITE CHMOD 644 hello.txt", 200), ("PWD", 257), ("MODE S", 200)]:
        assert r.cmd(line)[0] == want, line
    # the server's multi-line replies are relayed intact
    code, lines = r.cmd("HELP")
    assert code == 214 and len(lines) > 3 and lines[0].startswith("214-")
    assert lines[-1].startswith("214 ")


def test_passive_address_named_in_227(proxy):
    hp = proxy("passive_address = 127.0.0.3\n")
    r = Raw(*hp)
    r.login()
    code, lines = r.cmd("PASV")
    assert code == 227 and "(127,0,0,3," in lines[-1]


# -- B29: bounce ---------------------------------------------------------------------

def test_b29_bounce_refused_then_legit_port(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    assert r.cmd("TYPE I")[0] == 200
    assert r.cmd("PORT 198,51,100,7,0,25")[0] == 500
    assert r.cmd("EPRT |1|198.51.100.7|25|")[0] == 500
    assert r.cmd("PORT 127,0,0,2,195,80")[0] == 500           # another host, even loopback
    assert r.cmd("EPRT |2|2001:db8::7|25|")[0] == 522
    assert r.cmd("PORT 127,0,0,1,0,25")[0] == 500
    assert r.cmd("PORT 127,0,0,1,256,1")[0] == 501
    # legit: our own listener; the infected file is refused before any connect
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.settimeout(2)
    port = lst.getsockname()[1]
    assert r.cmd("PORT 127,0,0,1,%d,%d" % (port >> 8, port & 255))[0] == 200
    code, lines = r.cmd("RETR eicar.com")
    assert code == 550 and EICAR_NAME in "\n".join(lines)
    with pytest.raises(socket.timeout):
        lst.accept()                                            # no data connection
    assert r.cmd("PORT 127,0,0,1,%d,%d" % (port >> 8, port & 255))[0] == 200
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    conn, _ = lst.accept()
    assert recv_all(conn) == b"hello\nworld\n"
    assert r.reply()[0] == 226
    lst.close()


def test_passive_connection_from_stranger_dropped(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    stranger = socket.socket()
    stranger.bind(("127.0.0.2", 0))
    stranger.settimeout(5)
    stranger.connect(("127.0.0.1", port))
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    assert recv_all(stranger) == b""                 # dropped, nothing sent to it
    assert recv_all(r.data_connect(port)) == b"hello\nworld\n"   # still the client's
    assert r.reply()[0] == 226


def test_stale_passive_listener_closed(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    port = r.pasv_port()
    socket.create_connection(("127.0.0.1", port), timeout=5).close()   # open now
    port = r.pasv_port()                      # a new EPSV closes the first listener ...
    assert r.cmd("PORT 127,0,0,1,200,1")[0] == 200     # ... and PORT closes this one
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    port2 = r.pasv_port()
    port3 = r.pasv_port()
    if port2 != port3:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port2), timeout=5)
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    assert recv_all(r.data_connect(port3)) == b"hello\r\nworld\r\n"     # TYPE A: the default
    assert r.reply()[0] == 226


# -- B32: injection ---------------------------------------------------------------

def test_b32_control_characters_never_split(proxy, ftpd):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    for sep in (b"\r", b"\n", b"\0"):
        r.send(b"RETR a.txt" + sep + b"DELE important.txt\r\n")
        code, lines = r.reply()
        assert code == 501, lines
    assert r.cmd("NOOP")[0] == 200                     # still in step
    assert server_file(ftpd, "important.txt") == b"keep me\n"
    # three proper lines are three commands, each checked on its own
    r.send(b"NOOP\r\nSITE EXEC rm\r\nPWD\r\n")
    assert [r.reply()[0] for _ in range(3)] == [200, 502, 257]
    # an overlong line is drained and answered once
    r.send(b"NOOP " + b"A" * 5000 + b"\r\n")
    assert r.reply()[0] == 500
    assert r.cmd("NOOP")[0] == 200


def test_b32_userhost_host_validated(proxy):
    hp = proxy("allowed_upstreams = 127.0.0.1\n", upstream="userhost")
    r = Raw(*hp)
    assert r.reply()[0] == 220
    for bad in (b"USER anonymous@host\rDELE x", b"USER a@ho st", b"USER a@host\0x",
                b"USER a@h%0d"):
        code, _ = r.cmd(bad)
        assert code in (501, 530), bad


# -- B34: truncated uploads ----------------------------------------------------------

def test_b34a_orderly_close_is_complete(proxy, ftpd):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send("STOR report.pdf\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    part = CLEAN[:len(CLEAN) * 4 // 10]
    d.sendall(part)
    d.close()                                          # FIN
    code, lines = r.reply()
    assert code == 226, lines
    assert server_file(ftpd, "report.pdf") == part     # exactly the bytes received


def test_b34b_reset_is_never_forwarded(proxy, ftpd, tmp_path):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send("STOR reset.pdf\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    d.sendall(CLEAN[:5000])
    time.sleep(0.2)
    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    d.close()                                          # RST
    code, lines = r.reply()
    assert code == 426, lines
    assert server_file(ftpd, "reset.pdf") is None
    assert r.cmd("NOOP")[0] == 200
    spool = os.path.join(str(tmp_path), "spool")
    wait_until(lambda: not [n for n in os.listdir(spool) if n.startswith("vgw-")],
               timeout=10, what="spool emptied")


def test_b34c_data_timeout_is_never_forwarded(proxy, ftpd):
    hp = proxy("data_timeout = 2\n")
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send("STOR stalled.bin\r\n")
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    d.sendall(b"x" * 1000)
    code, lines = r.reply()                           # no more data: the proxy times out
    assert code == 426, lines
    d.close()
    assert server_file(ftpd, "stalled.bin") is None


# -- B36: REST / APPE ------------------------------------------------------------------

def test_b36_fragments_never_assemble(proxy, ftpd):
    hp = proxy()
    f = client(hp)
    f1, f2 = EICAR[:34], EICAR[34:]
    assert f.storbinary("STOR frag.com", io.BytesIO(f1)).startswith("226")   # F1 alone is clean
    # REST before STOR: refused
    f.sendcmd("TYPE I")
    assert f.sendcmd("REST 34").startswith("350")
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR frag.com", io.BytesIO(f2))
    assert str(e.value).startswith("550")
    assert server_file(ftpd, "frag.com") == f1
    # APPE: the existing file plus the new part is scanned as one
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("APPE frag.com", io.BytesIO(f2))
    assert str(e.value).startswith("551") and EICAR_NAME in str(e.value)
    assert server_file(ftpd, "frag.com") == f1
    # a clean APPE goes through, and only the new part is appended
    assert f.storbinary("APPE frag.com", io.BytesIO(b"-tail")).startswith("226")
    assert server_file(ftpd, "frag.com") == f1 + b"-tail"
    # REST + APPE: refused
    f.sendcmd("REST 3")
    with pytest.raises(ftplib.error_perm):
        f.storbinary("APPE frag.com", io.BytesIO(b"zz"))


def test_b36_appe_to_missing_file_refused(proxy, ftpd):
    hp = proxy()
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("APPE no-such-file.bin", io.BytesIO(b"data"))
    assert str(e.value).startswith("550") and "whole" in str(e.value)
    assert server_file(ftpd, "no-such-file.bin") is None


def test_b36_resumed_download_scans_whole(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    assert r.cmd("REST 34")[0] == 350
    code, lines = r.cmd("RETR eicar.com")
    assert code == 550 and EICAR_NAME in "\n".join(lines)
    # a clean file resumes from the offset
    port = r.pasv_port()
    assert r.cmd("REST 6")[0] == 350
    r.send("RETR hello.txt\r\n")
    assert r.reply()[0] == 150
    assert recv_all(r.data_connect(port)) == b"world\n"
    assert r.reply()[0] == 226
    port = r.pasv_port()
    assert r.cmd("REST 999")[0] == 350
    assert r.cmd("RETR hello.txt")[0] == 554


# -- ABOR ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bigfile(ftpd):
    name = "big.bin"
    with open(os.path.join(ftpd.root, name), "wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(24):
            f.write(chunk)
    return name


def test_abor_oob_during_download(proxy, bigfile):
    hp = proxy()
    f = client(hp)
    f.voidcmd("TYPE I")
    conn = f.transfercmd("RETR " + bigfile)
    assert conn.recv(65536)
    resp = f.abort()                   # urgent data: SO_OOBINLINE keeps it in the stream
    assert resp.startswith("426")
    conn.close()
    assert f.getresp().startswith("226")
    assert f.voidcmd("NOOP").startswith("200")


@pytest.mark.parametrize("how", ["inband", "iac"])
def test_abor_during_upload_never_forwarded(proxy, ftpd, how):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    name = "aborted-%s.bin" % how
    r.send("STOR %s\r\n" % name)
    assert r.reply()[0] == 150
    d = r.data_connect(port)
    d.sendall(b"y" * 200000)
    if how == "iac":
        r.sock.sendall(b"\xff\xf4\xff", socket.MSG_OOB)
        r.send(b"\xf2ABOR\r\n")
    else:
        r.send(b"ABOR\r\n")
    assert r.reply()[0] == 426
    assert r.reply()[0] == 226
    d.close()
    assert r.cmd("NOOP")[0] == 200
    assert server_file(ftpd, name) is None


def test_abor_without_transfer(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    assert r.cmd("ABOR")[0] == 225


# -- scanner trouble, skip_extensions, progress -----------------------------------------

def test_scanner_unavailable_is_tempfail(proxy, tmp_path):
    hp = proxy(scanner=["unix:%s/no-such-clamd.sock" % tmp_path])
    f = client(hp)
    with pytest.raises(ftplib.error_temp) as e:
        f.retrbinary("RETR hello.txt", lambda b: None)
    assert str(e.value).startswith("451")
    with pytest.raises(ftplib.error_temp):
        f.storbinary("STOR never.bin", io.BytesIO(b"data"))


def test_skip_extensions_but_content_wins(proxy, ftpd):
    hp = proxy("skip_extensions = .txt, .gif\n")
    f = client(hp)
    # a plain .txt is not scanned (the patent's rule) ...
    assert f.storbinary("STOR eicar-note.txt", io.BytesIO(EICAR)).startswith("226")
    # ... but an executable or archive is scanned whatever its name
    exe = b"MZ" + b"\0" * 100 + EICAR
    with pytest.raises(ftplib.error_perm):
        f.storbinary("STOR program.txt", io.BytesIO(exe))
    zbuf = io.BytesIO()
    import zipfile
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("eicar.com", EICAR)
    with pytest.raises(ftplib.error_perm):
        f.storbinary("STOR archive.gif", io.BytesIO(zbuf.getvalue()))
    assert server_file(ftpd, "program.txt") is None and server_file(ftpd, "archive.gif") is None


class SlowClamd:
    """A real TCP path to the real clamd that waits `delay` seconds before
    it connects through (a slow scanner, for keep-alive tests)."""

    def __init__(self, target_port, delay):
        import threading
        self.lst = socket.socket()
        self.lst.bind(("127.0.0.1", 0))
        self.lst.listen(8)
        self.port = self.lst.getsockname()[1]
        self.target = target_port
        self.delay = delay
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        import threading
        while not self.stop:
            try:
                c, _ = self.lst.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(c,), daemon=True).start()

    def handle(self, c):
        import threading
        time.sleep(self.delay)
        try:
            u = socket.create_connection(("127.0.0.1", self.target), timeout=10)
        except OSError:
            c.close()
            return

        def pipe(a, b):
            try:
                while True:
                    d = a.recv(65536)
                    if not d:
                        break
                    b.sendall(d)
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        threading.Thread(target=pipe, args=(u, c), daemon=True).start()
        pipe(c, u)

    def close(self):
        self.stop = True
        self.lst.close()


@pytest.mark.parametrize("name,infected", [("hello.txt", False), ("eicar.com", True)])
def test_progress_keepalives(proxy, clamd, name, infected):
    slow = SlowClamd(clamd.tcp_port, 3.5)
    try:
        hp = proxy("progress = yes\nprogress_interval = 1\n",
                   scanner=["tcp:127.0.0.1:%d" % slow.port])
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        port = r.pasv_port()
        r.send("RETR %s\r\n" % name)
        code, lines = r.reply()
        assert code == 150 and len(lines) >= 3, lines       # 150- lines, then '150 '
        assert lines[0].startswith("150-") and lines[-1].startswith("150 ")
        if infected:
            code, lines = r.reply()
            assert code == 451 and EICAR_NAME in "\n".join(lines)
        else:
            assert recv_all(r.data_connect(port)) == b"hello\nworld\n"
            assert r.reply()[0] == 226
        assert r.cmd("NOOP")[0] == 200
    finally:
        slow.close()


# -- configuration and upstream trouble -----------------------------------------------

def test_bad_config_is_421(tmp_path):
    conf = write_config(tmp_path, "[ftp]\nbogus_key = 1\n")
    with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
        r = Raw(*hp)
        code, lines = r.reply()
        assert code == 421


def test_upstream_unreachable_is_421(proxy):
    from tests.rig.activate import free_port
    hp = proxy(upstream="tcp:127.0.0.1:%d" % free_port())
    r = Raw(*hp)
    assert r.reply()[0] == 220
    code, lines = r.cmd("USER user")
    assert code == 421


def test_idle_timeout(proxy):
    hp = proxy("timeout = 1\n")
    r = Raw(*hp)
    r.login()
    code, _ = r.reply()
    assert code == 421


# -- userhost ------------------------------------------------------------------------

def test_userhost_inside_and_outside(proxy, ftpd, tmp_path):
    hp = proxy("allowed_upstreams = 127.0.0.1:%d\n[networks]\ninside = 127.0.0.1/32\n"
               % ftpd.port, upstream="userhost")
    # an inside client reaches the allowed server
    f = ftplib.FTP()
    f.connect(*hp, timeout=20)
    f.login("user@127.0.0.1:%d" % ftpd.port, "secret")
    assert "hello.txt" in f.nlst()
    f.quit()
    # an outside client (127.0.0.2) never reaches loopback, allowed or not
    for target in ("127.0.0.1:%d" % ftpd.port, "localhost:%d" % ftpd.port,
                   "[::1]:%d" % ftpd.port, "127.0.0.1", "10.0.0.1"):
        r = Raw(*hp, source="127.0.0.2")
        assert r.reply()[0] == 220
        code, lines = r.cmd("USER user@" + target)
        assert code == 530, (target, lines)
        r.close()
    # inside, but not in allowed_upstreams (port 21 implied)
    r = Raw(*hp)
    r.reply()
    assert r.cmd("USER user@127.0.0.1")[0] == 530
    assert "denied" in log_text(tmp_path)


# -- more: names, direction, ABOR during the scan, quarantine trouble ---------------------

def test_non_utf8_names_relayed_as_bytes(proxy):
    hp = proxy()
    r = Raw(*hp)
    r.login()
    r.cmd("TYPE I")
    port = r.pasv_port()
    r.send(b"STOR caf\xe9-\xff\xfe.bin\r\n")
    code, lines = r.reply()
    if code == 150:
        d = r.data_connect(port)
        d.sendall(b"latin-1 name")
        d.close()
        code, lines = r.reply()
    assert 200 <= code < 600 and code != 421, lines   # a proper reply, no crash
    assert r.cmd(b"SIZE caf\xe9-\xff\xfe.bin")[0] in (213, 550)
    assert r.cmd("NOOP")[0] == 200


def test_actions_by_direction(proxy, ftpd, tmp_path):
    """inside = 127.0.0.1 (the server); the client at 127.0.0.2 is outside:
    its uploads are inbound, its downloads outbound."""
    hp = proxy("action = delete\n[[inbound]]\naction = quarantine\n[[outbound]]\naction = pass\n"
               "[networks]\ninside = 127.0.0.1/32\n")
    f = client(hp, source="127.0.0.2")
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR inbound.com", io.BytesIO(EICAR))
    assert str(e.value).startswith("551") and "Quarantined as" in str(e.value)
    out = io.BytesIO()
    resp = f.retrbinary("RETR eicar.com", out.write)        # outbound: pass
    assert out.getvalue() == EICAR and EICAR_NAME in resp
    f.quit()
    wait_until(lambda: "direction=outbound" in log_text(tmp_path), timeout=10, what="log")
    assert "direction=inbound" in log_text(tmp_path)
    # an inside client: both ends inside, the base section (delete) applies
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.retrbinary("RETR eicar.com", lambda b: None)
    assert str(e.value).startswith("550") and "Quarantined" not in str(e.value)


def test_abor_during_scan(proxy, clamd):
    slow = SlowClamd(clamd.tcp_port, 4)
    try:
        hp = proxy(scanner=["tcp:127.0.0.1:%d" % slow.port])
        r = Raw(*hp)
        r.login()
        r.cmd("TYPE I")
        r.pasv_port()
        r.send("RETR hello.txt\r\n")
        time.sleep(0.5)                      # fetched, now waiting for the scanner
        r.send("ABOR\r\n")
        assert r.reply()[0] == 426
        assert r.reply()[0] == 226
        assert r.cmd("NOOP")[0] == 200
    finally:
        slow.close()


def test_quarantine_failure_is_temporary(proxy, ftpd):
    hp = proxy("action = quarantine\n[quarantine]\ndirectory = /proc/no-such-dir/q\n")
    f = client(hp)
    with pytest.raises(ftplib.error_temp) as e:
        f.storbinary("STOR q-fail.com", io.BytesIO(EICAR))
    assert str(e.value).startswith("451")
    assert server_file(ftpd, "q-fail.com") is None


def test_server_refusal_after_scan_relayed(proxy, ftpd):
    hp = proxy()
    f = client(hp, user="anonymous", password="guest@example.com")   # read-only
    with pytest.raises(ftplib.error_perm) as e:
        f.storbinary("STOR anon.bin", io.BytesIO(b"clean"))
    text = str(e.value)
    assert text.startswith("550") and "anon.bin: OK" in text          # the server's code
    assert server_file(ftpd, "anon.bin") is None
    with pytest.raises(ftplib.error_perm):
        f.retrbinary("RETR no-such-file", lambda b: None)
    assert f.voidcmd("NOOP").startswith("200")


# -- the case scripts replayed: every C> line with a P< answer ------------------------------

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cases")


def script_steps(name):
    """(bytes to send, allowed reply codes) for each 'C>' line of a case
    script followed by a 'P<' line.  The documentation addresses become
    the test's: the client 192.0.2.10 is 127.0.0.1 here."""
    import re as _re
    steps, pending = [], None
    with open(os.path.join(CASES, name), encoding="utf-8") as f:
        for line in f:
            if line.startswith("C> "):
                text = line[3:].split("   #")[0].split("  #")[0].rstrip()
                text = text.replace("192,0,2,10", "127,0,0,1").replace("192.0.2.10", "127.0.0.1")
                raw = text.encode().replace(b"\\r", b"\r").replace(b"\\n", b"\n").replace(
                    b"\\0", b"\0")
                if not raw.endswith(b"\r\n"):
                    raw += b"\r\n"
                pending = raw
            elif line.startswith("P< ") and pending is not None:
                codes = {int(line[3:6])}
                codes |= {int(c) for c in _re.findall(r"\bor (\d{3})\b", line)}
                steps.append((pending, codes))
                pending = None
    return steps


@pytest.mark.parametrize("case", ["B29-ftp-bounce-port-eprt.ftp.txt",
                                  "B32-ftp-crlf-nul-command-injection.ftp.txt"])
def test_case_script_replayed(proxy, ftpd, case):
    steps = script_steps(case)
    assert len(steps) >= 3
    hp = proxy()
    r = Raw(*hp)
    r.login()
    for raw, codes in steps:
        r.send(raw)
        code, lines = r.reply()
        assert code in codes, (raw, lines)
    if case.startswith("B29"):
        # the last step set PORT to 127.0.0.1:50000; the infected RETR is
        # refused before any connection is attempted (nothing listens there)
        code, lines = r.cmd("RETR eicar.com")
        assert code == 550 and EICAR_NAME in "\n".join(lines)
    else:
        assert server_file(ftpd, "important.txt") == b"keep me\n"
    assert r.cmd("NOOP")[0] == 200


@pytest.mark.parametrize("how", ["reject", "quarantine", "pass"])
def test_unscannable_size_limit(tmp_path, clamd, ftpd, how):
    """Over [scanner] max_size: the proxy stops reading at max_size and
    refuses (552 up, 550 down) whatever on_unscannable says: it never holds
    the whole, so it can neither scan, quarantine nor pass it."""
    up_code, down_code = 552, 550
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\nmax_size = 1000\non_unscannable = %s\n"
                        "[smtp]\nmax_message_size = 1000\n"
                        "[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %s\n"
                        % (", ".join(clamd.endpoints), how, ftpd.port, passive_range()))
    with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
        f = client(hp)
        name = "big-%s.bin" % how
        try:
            resp = f.storbinary("STOR " + name, io.BytesIO(b"z" * 5000))
        except ftplib.error_perm as e:
            resp = str(e)
        assert int(resp[:3]) == up_code and "size-limit" in resp, resp
        assert "Quarantined as" not in resp
        assert server_file(ftpd, name) is None
        try:
            resp = f.retrbinary("RETR clean.bin", lambda b: None)
        except ftplib.error_perm as e:
            resp = str(e)
        assert int(resp[:3]) == down_code and "size-limit" in resp, resp
        # the server's aborted transfer left the control connection in step
        got = []
        assert f.retrbinary("RETR hello.txt", got.append).startswith("226")
        assert b"".join(got) == b"hello\nworld\n"
        f.quit()


# -- hostile or unusual servers -------------------------------------------------------

def test_server_227_address_never_trusted(tmp_path, clamd, ftpd):
    """A server that refuses EPSV and names a foreign host in its 227: the
    proxy falls back to PASV and connects to the server's control address."""
    root = tmp_path / "liar"
    root.mkdir()
    (root / "f.txt").write_bytes(b"from the liar\n")
    with PyFtpd(root, masquerade="192.0.2.1", no_epsv=True) as liar:
        conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[ftp]\nupstream = tcp:127.0.0.1:%d\n"
                            "passive_ports = %s\ndata_timeout = 5\n"
                            % (", ".join(clamd.endpoints), liar.port, passive_range()))
        with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
            f = client(hp)
            out = io.BytesIO()
            assert f.retrbinary("RETR f.txt", out.write).startswith("226")
            assert out.getvalue() == b"from the liar\n"
            assert f.storbinary("STOR g.txt", io.BytesIO(b"up")).startswith("226")
            assert (root / "g.txt").read_bytes() == b"up"


def test_server_speaking_garbage_is_421(tmp_path, clamd):
    import threading
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    lst.settimeout(20)

    def serve():
        try:
            c, _ = lst.accept()
        except OSError:
            return
        c.sendall(b"220 hello\r\n")
        c.recv(100)
        c.sendall(b"this is not ftp\r\n")
        time.sleep(1)
        c.close()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[ftp]\nupstream = tcp:127.0.0.1:%d\n"
                        % (", ".join(clamd.endpoints), lst.getsockname()[1]))
    try:
        with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
            r = Raw(*hp)
            assert r.reply()[0] == 220
            code, lines = r.cmd("USER x")
            assert code == 421, lines
            with pytest.raises((EOFError, OSError)):
                r.cmd("NOOP")
    finally:
        lst.close()
        th.join(5)


def test_hostile_client_bytes_never_crash(proxy):
    """Arbitrary bytes on the control connection get replies, never a
    traceback or a dead session."""
    import random as _r
    rnd = _r.Random(4)
    hp = proxy()
    r = Raw(*hp)
    r.login()
    for _ in range(60):
        junk = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        junk = junk.replace(b"\r\n", b"").replace(b"\xff", b"")   # IAC SB would swallow the CRLF
        r.send(junk + b"\r\n")
        code, lines = r.reply()
        assert 200 <= code < 600 and code != 421, (junk, lines)
        assert not any("Traceback" in l for l in lines)
    assert r.cmd("NOOP")[0] == 200


def test_spool_trouble_is_temporary(proxy, ftpd):
    hp = proxy("[spool]\ndirectory = /proc/no-such-spool\n")
    f = client(hp)
    with pytest.raises(ftplib.error_temp) as e:
        f.storbinary("STOR spool-fail.bin", io.BytesIO(b"data"))
    assert str(e.value).startswith("451")
    with pytest.raises(ftplib.error_temp):
        f.retrbinary("RETR hello.txt", lambda b: None)
    assert f.voidcmd("NOOP").startswith("200")
    assert server_file(ftpd, "spool-fail.bin") is None


def test_keep_blocked_copy_of_deleted_file(proxy, tmp_path):
    hp = proxy("action = delete\n")
    f = client(hp)
    with pytest.raises(ftplib.error_perm) as e:
        f.retrbinary("RETR eicar.com", lambda b: None)
    assert "Quarantined" not in str(e.value)          # delete: the entry is not named
    qdir = os.path.join(str(tmp_path), "quarantine")
    entries = wait_until(lambda: [n for n in os.listdir(qdir) if os.path.exists(
        os.path.join(qdir, n, "meta.json"))], timeout=10, what="a blocked copy")
    with open(os.path.join(qdir, entries[0], "meta.json")) as m:
        meta = json.load(m)
    assert meta["state"] == "blocked" and meta["action"] == "delete"
    assert meta["ftp_path"] == "eicar.com" and EICAR_NAME in meta["viruses"]
    # the same bytes refused again (and again) are not kept again: a remote
    # client cannot fill the store by repeating a refused RETR
    for _ in range(3):
        with pytest.raises(ftplib.error_perm):
            f.retrbinary("RETR eicar.com", lambda b: None)
    assert f.voidcmd("NOOP").startswith("200")
    assert [n for n in os.listdir(qdir) if not n.startswith(".")] == entries
