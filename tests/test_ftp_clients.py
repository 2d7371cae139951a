"""The FTP proxy with real clients (curl, lftp), IPv6 and dual-stack
listeners, vsftpd spawned in command: mode, and one 200 MB file up and down.
All under systemd-socket-activate with the real clamd fixture."""

import contextlib
import ftplib
import hashlib
import io
import os
import random
import shutil
import subprocess

import pytest

from tests.rig.activate import activated, proxy_argv, write_config
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.ftp import PyFtpd, Raw, vsftpd_config, VSFTPD

CURL = shutil.which("curl") or "/usr/bin/curl"
LFTP = shutil.which("lftp") or "/usr/bin/lftp"


def passive_range():
    base = random.randrange(35000, 37800)
    return "%d-%d" % (base, base + 99)


def make_root(root):
    root = str(root)
    with open(os.path.join(root, "hello.txt"), "wb") as f:
        f.write(b"hello\nworld\n")
    with open(os.path.join(root, "eicar.com"), "wb") as f:
        f.write(EICAR)
    return root


@pytest.fixture
def setup(tmp_path, clamd):
    """setup(server_host, proxy_host, extra, upstream, scanner_extra) ->
    ((proxy host, port), server root)."""
    stack = contextlib.ExitStack()

    def make(server_host="127.0.0.1", proxy_host="127.0.0.1", extra="", upstream=None,
             scanner_extra=""):
        root = tmp_path / ("root-%d" % random.randrange(1 << 30))
        root.mkdir()
        root = make_root(root)
        if upstream is None:
            srv = stack.enter_context(PyFtpd(root, host=server_host))
            upstream = ("tcp:[%s]:%d" if ":" in server_host else "tcp:%s:%d") % (
                server_host, srv.port)
        text = ("[scanner]\nclamd = %s\ntimeout = 60\n%s[ftp]\nupstream = %s\n"
                "passive_ports = %s\ndata_timeout = 30\n" % (
                    ", ".join(clamd.endpoints), scanner_extra, upstream, passive_range()))
        conf = write_config(tmp_path, text + extra)
        hp = stack.enter_context(activated(proxy_argv("virusgw-ftpproxy", conf),
                                           host=proxy_host))
        return hp, root
    yield make
    stack.close()


def run(argv, timeout=60, **kw):
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=timeout, **kw)


# -- IPv6 and dual stack ----------------------------------------------------------

@pytest.mark.parametrize("passive", [True, False])
def test_ipv6_both_legs(setup, passive):
    hp, root = setup(server_host="::1", proxy_host="::1")
    f = ftplib.FTP()
    f.connect("::1", hp[1], timeout=20)
    f.login("user", "secret")
    f.set_pasv(passive)                     # ftplib: EPSV / EPRT on IPv6
    data = os.urandom(100000)
    assert f.storbinary("STOR v6.bin", io.BytesIO(data)).startswith("226")
    with open(os.path.join(root, "v6.bin"), "rb") as g:
        assert g.read() == data
    out = io.BytesIO()
    assert f.retrbinary("RETR v6.bin", out.write).startswith("226")
    assert out.getvalue() == data
    with pytest.raises(ftplib.error_perm) as e:
        f.retrbinary("RETR eicar.com", lambda b: None)
    assert str(e.value).startswith("550") and EICAR_NAME in str(e.value)
    r = Raw("::1", hp[1])
    r.login()
    assert r.cmd("PASV")[0] == 425           # PASV cannot name an IPv6 address
    assert r.cmd("EPRT |2|::2|2000|")[0] == 500
    assert r.cmd("EPRT |1|127.0.0.1|2000|")[0] == 522


@pytest.mark.parametrize("passive", [True, False])
def test_dual_stack_listener_over_ipv4(setup, passive):
    hp, root = setup(proxy_host="::")
    assert hp[0] == "127.0.0.1"
    f = ftplib.FTP()
    f.connect("127.0.0.1", hp[1], timeout=20)
    f.login("user", "secret")
    f.set_pasv(passive)                     # PASV / PORT with an IPv4-mapped peer
    out = io.BytesIO()
    assert f.retrbinary("RETR hello.txt", out.write).startswith("226")
    assert out.getvalue() == b"hello\nworld\n"
    assert f.storbinary("STOR ds.bin", io.BytesIO(b"dual")).startswith("226")
    with pytest.raises(ftplib.error_perm):
        f.storbinary("STOR ds.com", io.BytesIO(EICAR))
    assert not os.path.exists(os.path.join(root, "ds.com"))


# -- curl -------------------------------------------------------------------------------

CURL_MODES = {
    "epsv": [],
    "pasv": ["--disable-epsv"],
    "eprt": ["-P", "-"],
    "port": ["-P", "127.0.0.1", "--disable-eprt"],
}


@pytest.mark.parametrize("mode", sorted(CURL_MODES))
def test_curl(setup, tmp_path, mode):
    hp, root = setup()
    base = "ftp://127.0.0.1:%d/" % hp[1]
    opts = [CURL, "-sS", "--max-time", "30", "--user", "user:secret"] + CURL_MODES[mode]
    p = run(opts + [base + "hello.txt"])
    assert p.returncode == 0, p.stderr
    assert p.stdout == b"hello\nworld\n"
    p = run(opts + [base + "eicar.com"])
    assert p.returncode != 0 and p.stdout == b""
    up = tmp_path / ("up-%s.bin" % mode)
    up.write_bytes(os.urandom(50000))
    p = run(opts + ["-T", str(up), base + "up.bin"])
    assert p.returncode == 0, p.stderr
    with open(os.path.join(root, "up.bin"), "rb") as g:
        assert g.read() == up.read_bytes()
    bad = tmp_path / "bad.com"
    bad.write_bytes(EICAR)
    p = run(opts + ["-T", str(bad), base + "bad.com"])
    assert p.returncode != 0
    assert not os.path.exists(os.path.join(root, "bad.com"))


# -- lftp -------------------------------------------------------------------------------

@pytest.mark.parametrize("passive", ["on", "off"])
def test_lftp(setup, tmp_path, passive):
    hp, root = setup()
    work = tmp_path / ("lftp-" + passive)
    work.mkdir()
    (work / "clean.txt").write_bytes(b"some clean text\n" * 100)
    (work / "virus.com").write_bytes(EICAR)
    # lftp tries AUTH TLS first (refused with 502) and carries on in plain text
    script = ("set net:max-retries 1; set net:timeout 10; set cmd:fail-exit no; "
              "set ftp:passive-mode %s; set xfer:clobber on; "
              "get hello.txt -o got.txt; put clean.txt; put virus.com; get eicar.com -o e.out; "
              "bye" % passive)
    p = run([LFTP, "-u", "user,secret", "-p", str(hp[1]), "-e", script, "127.0.0.1"],
            cwd=str(work), timeout=90)
    assert (work / "got.txt").read_bytes() == b"hello\nworld\n", p.stderr
    with open(os.path.join(root, "clean.txt"), "rb") as g:
        assert g.read() == b"some clean text\n" * 100
    assert not os.path.exists(os.path.join(root, "virus.com"))
    assert not (work / "e.out").exists() or (work / "e.out").read_bytes() == b""
    assert EICAR_NAME.encode() in p.stderr


# -- vsftpd in command: mode -----------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(VSFTPD), reason="vsftpd not installed")
def test_vsftpd_command_mode(setup, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("vsftpd in inetd mode needs root")
    # vsftpd checks its folders' owners: use a directory outside pytest's 0700 root
    import tempfile
    vdir = tempfile.mkdtemp(prefix="vgw-vsftpd-", dir="/tmp")
    try:
        base = random.randrange(38000, 38900)
        conf, anon = vsftpd_config(vdir, pasv=(base, base + 50))
        with open(os.path.join(anon, "hello.txt"), "wb") as f:
            f.write(b"from vsftpd\n")
        with open(os.path.join(anon, "eicar.com"), "wb") as f:
            f.write(EICAR)
        hp, _ = setup(upstream="command:%s %s" % (VSFTPD, conf))
        f = ftplib.FTP()
        f.connect(*hp, timeout=20)
        f.login("anonymous", "guest@example.com")
        out = io.BytesIO()
        assert f.retrbinary("RETR hello.txt", out.write).startswith("226")
        assert out.getvalue() == b"from vsftpd\n"
        with pytest.raises(ftplib.error_perm) as e:
            f.retrbinary("RETR eicar.com", lambda b: None)
        assert EICAR_NAME in str(e.value)
        f.cwd("incoming")
        assert f.storbinary("STOR up.txt", io.BytesIO(b"uploaded\n")).startswith("226")
        with open(os.path.join(anon, "incoming", "up.txt"), "rb") as g:
            assert g.read() == b"uploaded\n"
        with pytest.raises(ftplib.error_perm):
            f.storbinary("STOR up.com", io.BytesIO(EICAR))
        assert not os.path.exists(os.path.join(anon, "incoming", "up.com"))
        f.quit()
    finally:
        shutil.rmtree(vdir, ignore_errors=True)


# -- one 200 MB file ------------------------------------------------------------------

def test_200mb_up_and_down(setup, tmp_path):
    size = 200 * 1000 * 1000
    # the scanner's max_size above the file (the clamd fixture allows 400M)
    hp, root = setup(scanner_extra="max_size = 300000000\n")
    src = tmp_path / "big.bin"
    h = hashlib.sha256()
    block = os.urandom(1 << 20)
    with open(str(src), "wb") as f:
        left = size
        while left:
            b = block[:min(left, len(block))]
            f.write(b)
            h.update(b)
            left -= len(b)
            block = block[1:] + block[:1]
    digest = h.hexdigest()
    f = ftplib.FTP()
    f.connect(*hp, timeout=180)
    f.login("user", "secret")
    with open(str(src), "rb") as g:
        assert f.storbinary("STOR big.bin", g, blocksize=1 << 20).startswith("226")
    os.unlink(str(src))
    hs = hashlib.sha256()
    with open(os.path.join(root, "big.bin"), "rb") as g:
        for chunk in iter(lambda: g.read(1 << 20), b""):
            hs.update(chunk)
    assert hs.hexdigest() == digest
    hd = hashlib.sha256()
    n = [0]

    def take(b):
        hd.update(b)
        n[0] += len(b)
    assert f.retrbinary("RETR big.bin", take, blocksize=1 << 20).startswith("226")
    assert n[0] == size and hd.hexdigest() == digest
    f.quit()
    os.unlink(os.path.join(root, "big.bin"))
