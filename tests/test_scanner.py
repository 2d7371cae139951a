"""scanlib.scanner against a real clamd (tests/rig/clamd.py): every method
and endpoint kind, archives, mail, failover, timeouts, a clamd killed
mid-scan, both size limits, encrypted archives, unreadable files, a full
accept queue, unlinked files, hostile file names, and the pure reply parser.
"""

import gzip
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import zlib

import pytest
from hypothesis import given, strategies as st

from scanlib.scanner import Scanner, parse_reply, verdict_line
from scanlib.spool import Spool
from scanlib.verdict import Clean, Infected, Unscannable
from tests.rig import clamd as rig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(REPO, "tests", "cases")
EICAR_HIT = Infected([rig.EICAR_NAME])


# -- sample builders ---------------------------------------------------------

def make_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def make_targz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def nested_archive(payload):
    """zip > tar.gz > gzip > zip > payload: four layers clamd must open."""
    inner = make_zip({"docs/readme.txt": b"hello\n", "docs/payload.com": payload})
    gz = gzip.compress(inner)
    tgz = make_targz({"level2/inner.zip.gz": gz, "level2/notes.txt": b"notes\n"})
    return make_zip({"level1/bundle.tar.gz": tgz})


def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


def zipcrypto(name, data, password):
    """A one-member zip, stored, with traditional PKWARE encryption
    (zipfile can read these but not write them; no `zip` binary needed)."""
    table = _crc_table()
    keys = [0x12345678, 0x23456789, 0x34567890]

    def crc(k, b):
        return (k >> 8) ^ table[(k ^ b) & 0xFF]

    def update(b):
        keys[0] = crc(keys[0], b)
        keys[1] = (keys[1] + (keys[0] & 0xFF)) & 0xFFFFFFFF
        keys[1] = (keys[1] * 134775813 + 1) & 0xFFFFFFFF
        keys[2] = crc(keys[2], keys[1] >> 24)

    def encrypt(b):
        t = (keys[2] | 2) & 0xFFFF
        c = b ^ (((t * (t ^ 1)) >> 8) & 0xFF)
        update(b)
        return c

    for b in password:
        update(b)
    crc32 = zlib.crc32(data) & 0xFFFFFFFF
    header = bytes(range(11)) + bytes([crc32 >> 24])
    body = bytes(encrypt(b) for b in header + data)
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 1, 0, 0, 0, crc32, len(body),
                        len(data), len(fname), 0) + fname
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 1, 0, 0, 0, crc32,
                          len(body), len(data), len(fname), 0, 0, 0, 0, 0, 0) + fname
    cd_offset = len(local) + len(body)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), cd_offset, 0)
    return local + body + central + end


# -- helpers -----------------------------------------------------------------

@pytest.fixture
def sample(tmp_path):
    """sample(data, name='sample') -> absolute path of a new file."""
    def make(data, name="sample"):
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)
    return make


def endpoints_for(c, kind):
    return {"unix": [c.unix_endpoint], "tcp": [c.tcp_endpoint], "both": c.endpoints}[kind]


def open_fds():
    return len(os.listdir("/proc/self/fd"))


class Listener:
    """A listening socket that never accepts (a silent endpoint, or a full
    accept queue), closed at exit."""

    def __init__(self, family, address, backlog):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        self.sock.listen(backlog)
        self.address = self.sock.getsockname()
        self.clients = []

    def fill(self):
        """Connect until the kernel refuses with EAGAIN (unix sockets)."""
        for _ in range(1000):
            c = socket.socket(self.sock.family, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(self.address)
            except BlockingIOError:
                c.close()
                return
            self.clients.append(c)
        raise AssertionError("accept queue never filled")

    def close(self):
        for c in self.clients:
            c.close()
        self.clients = []
        self.sock.close()


class Relay(threading.Thread):
    """Accepts on `listener` (when started) and relays every connection to
    a TCP target: lets a test put a unix or IPv6 listener in front of the
    real clamd."""

    daemon = True

    def __init__(self, listener_sock, target):
        threading.Thread.__init__(self)
        self.listener = listener_sock
        self.target = target
        self.accepted = 0

    def run(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                up = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        try:
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def private_clamd(tmp_path):
    """A clamd of this test's own (the test may kill it)."""
    c = rig.Clamd(str(tmp_path / "own-clamd"))
    c.start()
    yield c
    c.stop()


# -- every method finds what it should -----------------------------------------

METHOD_ENDPOINTS = [("fildes", "unix"), ("stream", "unix"), ("stream", "tcp"),
                    ("path", "unix"), ("path", "tcp"), ("auto", "unix"), ("auto", "tcp")]


@pytest.mark.parametrize("method,kind", METHOD_ENDPOINTS)
def test_every_method_finds_every_signature(clamd, sample, method, kind):
    s = Scanner(endpoints_for(clamd, kind), method=method, timeout=30)
    eicar_nested = nested_archive(rig.EICAR)
    assert s.scan_file(sample(rig.EICAR, "plain")) == EICAR_HIT
    assert s.scan_file(sample(b"x" * 1000 + rig.EICAR + b"y" * 1000, "embedded")) == EICAR_HIT
    assert s.scan_file(sample(make_zip({"a/eicar.com": rig.EICAR}), "z.zip")) == EICAR_HIT
    assert s.scan_file(sample(eicar_nested, "nested.zip")) == EICAR_HIT
    assert s.scan_file(sample(b"...%s..." % rig.BODY_MARKER, "body")) == Infected([rig.BODY_NAME])
    assert s.scan_file(sample(rig.hash_sample(), "hash")) == Infected([rig.HASH_NAME])
    # the same archive without the payload, and the hash sample one byte longer: clean
    assert s.scan_file(sample(nested_archive(b"harmless"), "clean.zip")) == Clean()
    assert s.scan_file(sample(rig.hash_sample() + b"\n", "hash2")) == Clean()
    assert s.scan_file(sample(b"", "empty")) == Clean()


@pytest.mark.parametrize("method", ["fildes", "stream", "path"])
def test_file_objects_descriptors_and_paths(clamd, tmp_path, method):
    s = Scanner(clamd.endpoints, method=method, timeout=30)
    spool = Spool(str(tmp_path))
    with spool:
        f = spool.create()
        f.write(b"junk " + rig.EICAR)           # not flushed: the scanner flushes
        assert s.scan_file(f) == EICAR_HIT
        f.seek(2)
        assert s.scan_file(f.fileno()) == EICAR_HIT
        assert f.tell() == 2, "the caller's file position is left alone"
        assert s.scan_file(f.name) == EICAR_HIT
        f.close()


def test_mail_is_decoded_by_clamd(clamd):
    """ScanMail is on in the rig: a uuencoded EICAR inside text/plain is found
    (cases/B20a), so the proxies' whole-message scan means something."""
    s = Scanner(clamd.endpoints, timeout=30)
    assert s.scan_file(os.path.join(CASES, "B20a-uuencode-in-text-plain.eml")) == EICAR_HIT
    assert s.scan_file(os.path.join(CASES, "B03-dot-stuffing-roundtrip.smtp")) == Clean()


@pytest.mark.parametrize("method", ["fildes", "stream", "auto"])
def test_unlinked_file(clamd, tmp_path, method):
    """fildes needs no name at all: the spool may already have unlinked it."""
    s = Scanner(clamd.endpoints, method=method, timeout=30)
    p = tmp_path / "gone"
    p.write_bytes(rig.EICAR)
    with open(p, "rb") as f:
        os.unlink(p)
        assert s.scan_file(f) == EICAR_HIT


def test_unlinked_file_by_path_is_unavailable_not_clean(clamd, tmp_path):
    s = Scanner(clamd.endpoints, method="path", timeout=30)
    p = tmp_path / "gone"
    p.write_bytes(rig.EICAR)
    with open(p, "rb") as f:
        os.unlink(p)
        v = s.scan_file(f)
    assert isinstance(v, Unscannable) and v.reason == "unavailable"


@pytest.mark.parametrize("method", ["path", "fildes", "stream"])
def test_hostile_file_names(clamd, tmp_path, method):
    """A path holding ': ', ' FOUND', ': OK' or a newline is its own name,
    not part of the reply (pyclamd split at the first ': ')."""
    s = Scanner(clamd.endpoints, method=method, timeout=30)
    cases = {
        "evil: OK": (rig.EICAR, EICAR_HIT),
        "a: Fake.Virus FOUND": (b"clean text", Clean()),
        "x: y: z": (rig.EICAR, EICAR_HIT),
        "line\nbreak: OK": (rig.EICAR, EICAR_HIT),
        "sp ace ERROR": (b"clean", Clean()),
    }
    for name, (data, want) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert s.scan_file(str(p)) == want, name


def test_scan_many_keeps_order(clamd, sample):
    s = Scanner(clamd.endpoints, timeout=30, parallel=3)
    items = [sample(b"clean", "c1"), sample(rig.EICAR, "e"), sample(rig.BODY_MARKER, "b"),
             sample(rig.hash_sample(), "h"), "/nonexistent/file", sample(b"clean2", "c2")]
    got = s.scan_many(items)
    assert got[0] == Clean() and got[5] == Clean()
    assert got[1] == EICAR_HIT
    assert got[2] == Infected([rig.BODY_NAME])
    assert got[3] == Infected([rig.HASH_NAME])
    assert isinstance(got[4], Unscannable) and got[4].reason == "unavailable"
    assert s.scan_many([]) == []


def test_version_and_ping(clamd):
    s = Scanner(clamd.endpoints)
    assert s.version().startswith("ClamAV ")
    assert s.ping()
    dead = Scanner(["unix:/nonexistent/clamd.sock", "tcp:127.0.0.1:1"], connect_timeout=1)
    assert dead.version() == ""
    assert not dead.ping()


def test_from_config(clamd, tmp_path):
    from scanlib import config
    from tests.rig.activate import write_config
    path = write_config(tmp_path, "[scanner]\nclamd = %s, %s\nmethod = stream\ntimeout = 7\n"
                        "max_size = 60000000\nparallel = 2\n" % tuple(clamd.endpoints))
    s = Scanner.from_config(config.load(path)["scanner"])
    assert s.endpoints[0] == ("unix", clamd.unix_path)
    assert s.endpoints[1] == ("tcp", "127.0.0.1", clamd.tcp_port)
    assert (s.method, s.timeout, s.max_size, s.parallel) == ("stream", 7.0, 60000000, 2)


# -- failover, dead, silent and killed endpoints --------------------------------

def test_failover_when_first_endpoint_is_dead(clamd, sample, tmp_path):
    p = sample(rig.EICAR)
    refused_port = rig.free_port()
    stale = tmp_path / "stale.sock"          # a socket file nobody listens on
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    for first in ("unix:/nonexistent/clamd.sock", "unix:%s" % stale,
                  "tcp:127.0.0.1:%d" % refused_port):
        for second in clamd.endpoints:
            v = Scanner([first, second], timeout=30, connect_timeout=2).scan_file(p)
            assert v == EICAR_HIT, (first, second)


def test_all_endpoints_dead_is_unavailable(sample):
    before = open_fds()
    v = Scanner(["unix:/nonexistent/a.sock", "tcp:127.0.0.1:%d" % rig.free_port()],
                timeout=5, connect_timeout=1).scan_file(sample(rig.EICAR))
    assert isinstance(v, Unscannable) and v.reason == "unavailable"
    assert "/nonexistent/a.sock" in v.detail and "refused" in v.detail
    assert open_fds() == before


@pytest.mark.parametrize("family", ["tcp4", "tcp6", "unix"])
def test_silent_endpoint_times_out_once(sample, tmp_path, family):
    """An endpoint that accepts (the kernel does, from the backlog) and never
    answers: Unscannable('unavailable') after about the scan timeout, not
    five times it (pyclamd retried its recv five times)."""
    before = open_fds()
    if family == "tcp4":
        lis = Listener(socket.AF_INET, ("127.0.0.1", 0), 5)
        ep = "tcp:127.0.0.1:%d" % lis.address[1]
    elif family == "tcp6":
        if not socket.has_ipv6:
            pytest.skip("no IPv6")
        lis = Listener(socket.AF_INET6, ("::1", 0), 5)
        ep = "tcp:[::1]:%d" % lis.address[1]
    else:
        lis = Listener(socket.AF_UNIX, str(tmp_path / "silent.sock"), 5)
        ep = "unix:%s" % lis.address
    p = sample(b"x" * 1000)
    try:
        for method in ("stream", "path") + (("fildes",) if family == "unix" else ()):
            t0 = time.monotonic()
            v = Scanner([ep], method=method, timeout=1, connect_timeout=1).scan_file(p)
            elapsed = time.monotonic() - t0
            assert isinstance(v, Unscannable) and v.reason == "unavailable", v
            assert "timeout" in v.detail
            # A bound on correctness (one deadline), not on speed: 5x would be 5 s.
            assert elapsed < 3.5, elapsed
    finally:
        lis.close()
    assert open_fds() == before


def test_timeout_is_not_multiplied_by_failover(sample, tmp_path):
    """Two silent endpoints: the one deadline covers both."""
    a = Listener(socket.AF_INET, ("127.0.0.1", 0), 5)
    b = Listener(socket.AF_UNIX, str(tmp_path / "b.sock"), 5)
    try:
        t0 = time.monotonic()
        v = Scanner(["tcp:127.0.0.1:%d" % a.address[1], "unix:%s" % b.address],
                    timeout=1, connect_timeout=1).scan_file(sample(b"data"))
        assert isinstance(v, Unscannable) and v.reason == "unavailable"
        assert time.monotonic() - t0 < 3.5
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_clamd_killed_mid_scan(private_clamd, kind):
    """clamd dies (SIGKILL) while a stream is half sent: unavailable, never
    clean.  The data comes through a pipe, so the test decides exactly when
    clamd dies."""
    c = private_clamd
    s = Scanner([getattr(c, kind + "_endpoint")], method="stream", timeout=30)
    r, w = os.pipe()
    result = []
    t = threading.Thread(target=lambda: result.append(s.scan_file(r)), daemon=True)
    t.start()
    try:
        os.write(w, b"A" * (1 << 20))            # returns once the scanner took it
        os.write(w, b"B" * (1 << 20))
        pid = c.pid
        c.kill(signal.SIGKILL)
        c.proc.wait(10)
        assert not os.path.exists("/proc/%d/status" % pid) or c.proc.returncode is not None
        os.set_blocking(w, False)     # the scanner may have stopped reading
        try:
            os.write(w, b"C" * 65536)
        except OSError:
            pass
    finally:
        os.close(w)
    t.join(30)
    os.close(r)
    assert not t.is_alive()
    v = result[0]
    assert isinstance(v, Unscannable) and v.reason == "unavailable", v


def test_clamd_dead_after_kill_fails_over(private_clamd, clamd, sample):
    c = private_clamd
    c.kill(signal.SIGKILL)
    c.proc.wait(10)
    # the killed clamd leaves its socket file behind: connect is refused
    v = Scanner([c.unix_endpoint, c.tcp_endpoint, clamd.unix_endpoint],
                timeout=30, connect_timeout=2).scan_file(sample(rig.EICAR))
    assert v == EICAR_HIT


# -- the accept queue ------------------------------------------------------------

def test_full_accept_queue_eagain_then_failover(clamd, sample, tmp_path):
    lis = Listener(socket.AF_UNIX, str(tmp_path / "full.sock"), 0)
    lis.fill()
    probe = socket.socket(socket.AF_UNIX)
    probe.settimeout(5)
    with pytest.raises(BlockingIOError):          # the precondition: EAGAIN at once
        probe.connect(lis.address)
    probe.close()
    p = sample(rig.EICAR)
    try:
        v = Scanner(["unix:%s" % lis.address], timeout=10, connect_timeout=0.5).scan_file(p)
        assert isinstance(v, Unscannable) and v.reason == "unavailable"
        assert "EAGAIN" in v.detail
        v = Scanner(["unix:%s" % lis.address, clamd.tcp_endpoint], timeout=10,
                    connect_timeout=0.5).scan_file(p)
        assert v == EICAR_HIT
    finally:
        lis.close()


def test_full_accept_queue_is_retried_within_connect_timeout(clamd, sample, tmp_path):
    """While the queue is full the scanner retries; once there is room (the
    relay starts accepting) the same scan goes through."""
    lis = Listener(socket.AF_UNIX, str(tmp_path / "busy.sock"), 0)
    lis.fill()
    p = sample(rig.EICAR)
    result = []
    s = Scanner(["unix:%s" % lis.address], method="stream", timeout=30, connect_timeout=20)
    t = threading.Thread(target=lambda: result.append(s.scan_file(p)), daemon=True)
    t.start()
    try:
        time.sleep(0.3)         # let the scanner meet EAGAIN (if it is slow, the test is weaker, not wrong)
        assert not result, "gave up on a full queue before the connect timeout: %r" % result
        for c in lis.clients:
            c.close()
        lis.clients = []
        relay = Relay(lis.sock, ("127.0.0.1", clamd.tcp_port))
        relay.start()
        t.join(30)
    finally:
        lis.close()
    assert result == [EICAR_HIT]


def test_ipv6_endpoint(clamd, sample):
    """tcp:[::1]:PORT works (pyclamd's TCP class was IPv4-only)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    lis = socket.socket(socket.AF_INET6)
    try:
        lis.bind(("::1", 0))
    except OSError:
        lis.close()
        pytest.skip("no ::1")
    lis.listen(5)
    Relay(lis, ("127.0.0.1", clamd.tcp_port)).start()
    try:
        ep = "tcp:[::1]:%d" % lis.getsockname()[1]
        assert Scanner([ep], timeout=30).scan_file(sample(rig.EICAR)) == EICAR_HIT
        assert Scanner([ep], timeout=30).version().startswith("ClamAV")
    finally:
        lis.close()


# -- size limits, encryption ------------------------------------------------------

def test_our_max_size_without_asking_clamd(sample):
    dead = ["unix:/nonexistent/clamd.sock"]
    v = Scanner(dead, max_size=100).scan_file(sample(b"x" * 101))
    assert v == Unscannable("size-limit") and "101" in v.detail
    # exactly max_size is scanned (here: clamd is dead, so unavailable)
    v = Scanner(dead, max_size=100, connect_timeout=1).scan_file(sample(b"x" * 100))
    assert v == Unscannable("unavailable")


def test_our_max_size_with_clamd(clamd, sample):
    s = Scanner(clamd.endpoints, max_size=len(rig.EICAR), timeout=30)
    assert s.scan_file(sample(rig.EICAR)) == EICAR_HIT
    assert s.scan_file(sample(rig.EICAR + b"\n")) == Unscannable("size-limit")


@pytest.mark.parametrize("method,kind,why", [
    ("stream", "unix", "INSTREAM size limit"),
    ("stream", "tcp", "INSTREAM size limit"),
    ("auto", "tcp", "INSTREAM size limit"),
    ("fildes", "unix", "Heuristics.Limits.Exceeded"),
    ("auto", "unix", "Heuristics.Limits.Exceeded"),   # auto on a unix socket is fildes
    ("path", "unix", "Heuristics.Limits.Exceeded"),
])
def test_clamd_limits_are_size_limit(clamd_small, sample, method, kind, why):
    """clamd_small: StreamMaxLength/MaxFileSize 32K.  Over it: size-limit,
    never clean (clamd's own answer would be OK unscanned without
    AlertExceedsMax, or a broken pipe)."""
    s = Scanner(endpoints_for(clamd_small, kind), method=method, timeout=30)
    big = sample(os.urandom(1 << 20) + rig.EICAR, "big")
    v = s.scan_file(big)
    assert v == Unscannable("size-limit"), v
    assert why in v.detail
    assert s.scan_file(sample(rig.EICAR, "small")) == EICAR_HIT


def test_stream_limit_in_a_single_huge_chunk(clamd_small, sample):
    """A chunk larger than StreamMaxLength: clamd replies and closes while we
    are still sending; the reply is read after the broken pipe."""
    s = Scanner([clamd_small.unix_endpoint], method="stream", timeout=30)
    for _ in range(3):
        assert s.scan_file(sample(b"z" * (4 << 20), "huge")) == Unscannable("size-limit")


@pytest.mark.parametrize("method", ["fildes", "stream", "path"])
def test_encrypted_archive_is_unscannable_encrypted(clamd, sample, method):
    data = zipcrypto("secret.com", rig.EICAR, b"infected")
    with zipfile.ZipFile(io.BytesIO(data)) as z:      # the writer is right
        assert z.read("secret.com", pwd=b"infected") == rig.EICAR
    v = Scanner(clamd.endpoints, method=method, timeout=30).scan_file(sample(data, "enc.zip"))
    assert v == Unscannable("encrypted") and v.detail.startswith("Heuristics.Encrypted")


# -- permissions --------------------------------------------------------------------

@pytest.fixture
def clamd_as_clamav():
    """A clamd that drops to the clamav user: it cannot read root's 0700
    temp folders, like a production clamd and the proxies' spool."""
    import pwd
    if os.geteuid() != 0:
        pytest.skip("needs root to start clamd as another user")
    try:
        pwd.getpwnam("clamav")
    except KeyError:
        pytest.skip("no clamav user")
    d = tempfile.mkdtemp(prefix="vgw-clamav-")
    c = rig.Clamd(d, user="clamav")
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_unreadable_file_by_path_is_unavailable_not_infected(clamd_as_clamav, tmp_path):
    p = tmp_path / "private" / "eicar.com"
    p.parent.mkdir(mode=0o700)
    p.write_bytes(rig.EICAR)
    os.chmod(p, 0o600)
    c = clamd_as_clamav
    v = Scanner([c.unix_endpoint], method="path", timeout=30).scan_file(str(p))
    assert v == Unscannable("unavailable"), v
    assert "denied" in v.detail.lower()
    # a directory holding it (pyclamd called that clean)
    v = Scanner([c.unix_endpoint], method="path", timeout=30).scan_file(str(p.parent))
    assert v == Unscannable("unavailable"), v
    # the same file handed over as a descriptor or a stream is found
    for method in ("fildes", "stream", "auto"):
        assert Scanner([c.unix_endpoint], method=method, timeout=30).scan_file(str(p)) \
            == EICAR_HIT


def test_files_we_cannot_open(clamd, tmp_path):
    s = Scanner(clamd.endpoints, timeout=30)
    v = s.scan_file(str(tmp_path / "missing"))
    assert v == Unscannable("unavailable") and "No such file" in v.detail
    # a pipe is not a regular file: clamd's FILDES says so (ERROR, not clean)
    r, w = os.pipe()
    os.write(w, rig.EICAR)
    os.close(w)
    try:
        v = Scanner([clamd.unix_endpoint], method="fildes", timeout=30).scan_file(r)
    finally:
        os.close(r)
    assert v == Unscannable("unavailable")


def test_never_raises(clamd):
    s = Scanner(clamd.endpoints, timeout=5)
    for item in (None, object(), 12345678, -1, "", b"/nonexistent\xff", 3.5):
        v = s.scan_file(item)
        assert isinstance(v, Unscannable) and v.reason == "unavailable", item


def test_no_socket_or_fd_leaks(clamd, clamd_small, sample):
    ok = Scanner(clamd.endpoints, timeout=30)
    small = Scanner([clamd_small.unix_endpoint], method="stream", timeout=30)
    dead = Scanner(["unix:/nonexistent/s", "tcp:127.0.0.1:%d" % rig.free_port()],
                   connect_timeout=1)
    e, big = sample(rig.EICAR, "e"), sample(b"q" * 100000, "big")
    for s in (ok, small, dead):             # warm up lazy imports
        s.scan_file(e)
    before = open_fds()
    for _ in range(5):
        ok.scan_file(e)
        ok.scan_many([e, big, e])
        small.scan_file(big)
        dead.scan_file(e)
        ok.version()
    assert open_fds() == before


def test_import_is_cheap():
    code = ("import sys, scanlib.scanner; "
            "bad = [m for m in ('pyclamd', 'threading', 'concurrent.futures', 'struct') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_construction():
    with pytest.raises(ValueError):
        Scanner(["smtp:nowhere"])
    with pytest.raises(ValueError):
        Scanner(["unix:/x"], method="carrier-pigeon")
    with pytest.raises(ValueError):
        Scanner([])


# -- the pure parts ------------------------------------------------------------------

@pytest.mark.parametrize("lines,want", [
    (["stream: OK"], Clean()),
    (["fd[7]: OK"], Clean()),
    (["/a/b: OK"], Clean()),
    (["stream: Eicar-Test FOUND"], Infected(["Eicar-Test"])),
    (["/p: a: b: Win.Trojan.X-1 FOUND"], Infected(["Win.Trojan.X-1"])),
    (["/x: OK: Name FOUND"], Infected(["Name"])),
    (["fd[3]: Heuristics.Limits.Exceeded.MaxFileSize FOUND"], Unscannable("size-limit")),
    (["stream: Heuristics.Encrypted.Zip FOUND"], Unscannable("encrypted")),
    (["stream: Heuristics.Encrypted.PDF FOUND"], Unscannable("encrypted")),
    (["INSTREAM size limit exceeded. ERROR"], Unscannable("size-limit")),
    (["/f: Access denied. ERROR"], Unscannable("unavailable")),
    (["fd[4]: Not a regular file ERROR"], Unscannable("unavailable")),
    (["UNKNOWN COMMAND"], Unscannable("unavailable")),
    ([], Unscannable("unavailable")),
    (["", "  "], Unscannable("unavailable")),
    (["/d/a: OK", "/d/b: Access denied. ERROR"], Unscannable("unavailable")),
    (["/d/a: X FOUND", "/d/b: Access denied. ERROR"], Infected(["X"])),
    (["/d/a: Heuristics.Encrypted.Zip FOUND", "/d/b: Y FOUND"], Infected(["Y"])),
    (["stream: FOUND"], Unscannable("unavailable")),
    (["stream: OK", "garbage"], Unscannable("unavailable")),
])
def test_parse_reply(lines, want):
    assert parse_reply(lines) == want


@given(st.lists(st.text(max_size=80), max_size=5))
def test_parse_reply_never_raises_and_never_invents_clean(lines):
    v = parse_reply(lines)
    if v == Clean():
        assert any(l.strip() == "OK" or l.strip().endswith(": OK") for l in lines)
        assert all(l.strip() == "" or l.strip() == "OK" or l.strip().endswith(": OK")
                   for l in lines)


@given(st.text(max_size=40), st.text(max_size=40))
def test_verdict_line_has_no_control_characters(name, detail):
    for v in (Clean(), Infected(["X"]), Unscannable("size-limit", detail),
              Unscannable("unavailable", detail)):
        line = verdict_line(name, v, detail=True)
        assert all(c.isprintable() for c in line)


def test_verdict_line_formats():
    assert verdict_line("f", Clean()) == "f: OK"
    assert verdict_line("f", Infected(["A", "B"])) == "f: A, B FOUND"
    assert verdict_line("f", Unscannable("size-limit", "why")) == "f: size-limit ERROR"
    assert verdict_line("f", Unscannable("size-limit", "why"), detail=True) == \
        "f: size-limit (why) ERROR"
    assert verdict_line("a\r\nb", Clean()) == "a??b: OK"


class OneShotServer(threading.Thread):
    """Answers every connection with `reply` after reading what the client
    sent (until it stops sending for a moment), then closes: a hostile or
    broken endpoint on a real socket."""

    daemon = True

    def __init__(self, reply):
        threading.Thread.__init__(self)
        self.reply = reply
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.endpoint = "tcp:127.0.0.1:%d" % self.sock.getsockname()[1]

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass
                try:
                    conn.sendall(self.reply)
                except OSError:
                    pass


@pytest.mark.parametrize("reply,want", [
    (b"", "unavailable"),
    (b"garbage\0", "unavailable"),
    (b"stream: \0", "unavailable"),
    (b"stream: OK\0stream: Trailing.Junk\0", "unavailable"),
    (b"x" * (2 << 20), "unavailable"),
    (b"stream: Some.Virus FOUND\0", "infected"),
    (b"stream: OK\0", "clean"),
])
def test_broken_or_hostile_endpoint(sample, reply, want):
    srv = OneShotServer(reply)
    srv.start()
    try:
        v = Scanner([srv.endpoint], method="stream", timeout=10).scan_file(sample(b"data"))
    finally:
        srv.sock.close()
    if want == "unavailable":
        assert v == Unscannable("unavailable"), v
    elif want == "infected":
        assert v == Infected(["Some.Virus"]), v
    else:
        assert v == Clean(), v


class DropMidStream(threading.Thread):
    """Reads a little of each connection, then closes it without a reply
    (unread data makes the close a reset): a clamd dying mid-stream."""

    daemon = True

    def __init__(self):
        threading.Thread.__init__(self)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.endpoint = "tcp:127.0.0.1:%d" % self.sock.getsockname()[1]

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            got = 0
            try:
                while got < 65536:
                    data = conn.recv(65536)
                    if not data:
                        break
                    got += len(data)
            except OSError:
                pass
            conn.close()


def test_lost_mid_stream_fails_over_with_a_regular_file(clamd, sample):
    srv = DropMidStream()
    srv.start()
    try:
        p = sample(b"\0" * (4 << 20) + rig.EICAR)
        s = Scanner([srv.endpoint, clamd.unix_endpoint], method="stream", timeout=30)
        assert s.scan_file(p) == EICAR_HIT
        with open(p, "rb") as f:
            assert s.scan_file(f) == EICAR_HIT
        v = Scanner([srv.endpoint], method="stream", timeout=30).scan_file(p)
        assert v == Unscannable("unavailable") and "lost while streaming" in v.detail
    finally:
        srv.sock.close()


def test_lost_mid_stream_never_resends_a_pipe(clamd):
    """A pipe half read by a failed endpoint would look empty (clean) to the
    next one: unavailable instead."""
    srv = DropMidStream()
    srv.start()
    r, w = os.pipe()
    result = []
    s = Scanner([srv.endpoint, clamd.unix_endpoint], method="stream", timeout=30)
    t = threading.Thread(target=lambda: result.append(s.scan_file(r)), daemon=True)
    t.start()
    try:
        os.set_blocking(w, False)
        sent = 0
        deadline = time.monotonic() + 20
        while t.is_alive() and time.monotonic() < deadline and sent < (8 << 20):
            try:
                sent += os.write(w, b"\0" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        os.close(w)
        w = None
        t.join(30)
    finally:
        if w is not None:
            os.close(w)
        srv.sock.close()
    os.close(r)
    assert result and result[0] == Unscannable("unavailable"), result
    assert "pipe" in result[0].detail
