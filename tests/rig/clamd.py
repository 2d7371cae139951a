"""A private clamd for tests, demos and benchmarks.

Clamd(workdir, ...) writes a clamd.conf under workdir (unix socket, a
loopback TCP port chosen at run time, temp and log files there, the test
signature database from tests/sigs), starts `clamd` in the foreground, waits
for PONG on both sockets with a deadline and stops it by PID.  No system
file is touched and nothing runs as a service.

The test signatures (tests/sigs):
  VirusGW.Test.EICAR  body signature: the 68-byte EICAR string anywhere
  VirusGW.Test.Body   body signature: BODY_MARKER anywhere
  VirusGW.Test.Hash   sha256 hash signature of hash_sample()
clamd appends '.UNOFFICIAL' to every name from an unsigned database, so the
names it reports are EICAR_NAME, BODY_NAME and HASH_NAME.

Run as a program it starts one and prints its endpoints (for `make demo`
and manual work):  python tests/rig/clamd.py [--small] DIR
"""

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIGS = os.path.join(os.path.dirname(HERE), "sigs")

# Built from base64 so that this source file itself is not a hit.
EICAR = base64.b64decode(
    b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=")
EICAR_NAME = "VirusGW.Test.EICAR.UNOFFICIAL"
BODY_MARKER = b"VIRUSGW-TEST-BODY-" + b"SIGNATURE/not-a-virus"
BODY_NAME = "VirusGW.Test.Body.UNOFFICIAL"
HASH_NAME = "VirusGW.Test.Hash.UNOFFICIAL"

# Limits of the default test clamd: large enough for the 200 MB transfer
# tests; the "small" variant is what the size-limit tests (and the B26 case,
# "test clamd StreamMaxLength 32K") expect.
DEFAULT_LIMITS = {"StreamMaxLength": "400M", "MaxFileSize": "400M", "MaxScanSize": "400M"}
SMALL_LIMITS = {"StreamMaxLength": "32K", "MaxFileSize": "32K", "MaxScanSize": "32K"}

CLAMD_CANDIDATES = ("/usr/sbin/clamd", "/usr/local/sbin/clamd")


def hash_sample():
    """The 4096-byte file whose sha256 is the VirusGW.Test.Hash signature."""
    return b"".join(hashlib.sha256(b"virusgw hash sample %d" % i).digest() for i in range(128))


def clamd_binary():
    """Path of clamd, or None when it is not installed."""
    for p in CLAMD_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("clamd")


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ping_unix(path, timeout=1.0):
    return _ping(socket.AF_UNIX, path, timeout)


def ping_tcp(host, port, timeout=1.0):
    return _ping(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port), timeout)


def _ping(family, address, timeout):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
        s.sendall(b"zPING\0")
        data = b""
        while not data.endswith(b"\0"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        return data.rstrip(b"\0") == b"PONG"
    except OSError:
        return False
    finally:
        s.close()


class ClamdError(RuntimeError):
    pass


class Clamd:
    """One private clamd.  Attributes once started: unix_path, tcp_port,
    endpoints (config strings: unix first, then tcp), pid, workdir, conf_path,
    log_path."""

    def __init__(self, workdir, limits=None, user=None, extra=None, sigs=SIGS,
                 start_timeout=60.0):
        self.workdir = os.path.abspath(workdir)
        self.limits = dict(DEFAULT_LIMITS)
        self.limits.update(limits or {})
        self.user = user
        self.extra = dict(extra or {})
        self.sigs = sigs
        self.start_timeout = start_timeout
        self.proc = None
        self.unix_path = os.path.join(self.workdir, "clamd.sock")
        if len(self.unix_path.encode()) > 100:    # sun_path holds 108 bytes
            import tempfile
            self.unix_path = os.path.join(tempfile.mkdtemp(prefix="vgw-clamd-", dir="/tmp"),
                                          "clamd.sock")
        self.tcp_port = None
        self.conf_path = os.path.join(self.workdir, "clamd.conf")
        self.log_path = os.path.join(self.workdir, "clamd.log")
        self.db_dir = os.path.join(self.workdir, "db")
        self.tmp_dir = os.path.join(self.workdir, "tmp")

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def endpoints(self):
        return ["unix:%s" % self.unix_path, "tcp:127.0.0.1:%d" % self.tcp_port]

    @property
    def tcp_endpoint(self):
        return "tcp:127.0.0.1:%d" % self.tcp_port

    @property
    def unix_endpoint(self):
        return "unix:%s" % self.unix_path

    def _write_config(self):
        for d in (self.workdir, self.db_dir, self.tmp_dir):
            os.makedirs(d, exist_ok=True)
        for name in os.listdir(self.sigs):
            if name.endswith((".ndb", ".hsb", ".hdb", ".ldb")):
                shutil.copy(os.path.join(self.sigs, name), self.db_dir)
        self.tcp_port = free_port()
        lines = {
            "Foreground": "yes",
            "LocalSocket": self.unix_path,
            "LocalSocketMode": "666",
            "FixStaleSocket": "yes",
            "TCPSocket": str(self.tcp_port),
            "TCPAddr": "127.0.0.1",
            "DatabaseDirectory": self.db_dir,
            "TemporaryDirectory": self.tmp_dir,
            "LogFile": self.log_path,
            "LogTime": "yes",
            "LogVerbose": "yes",
            "ScanMail": "yes",
            "ScanArchive": "yes",
            "AlertExceedsMax": "yes",
            "AlertEncrypted": "yes",
            "MaxThreads": "8",
            "MaxConnectionQueueLength": "30",
            "ReadTimeout": "30",
            "CommandReadTimeout": "10",
            "SelfCheck": "0",
            "Bytecode": "no",
        }
        lines.update(self.limits)
        lines.update(self.extra)
        if self.user:
            lines["User"] = self.user
            # clamd opens its log and sockets after dropping privileges.
            import pwd
            pw = pwd.getpwnam(self.user)
            for p in (self.workdir, self.db_dir, self.tmp_dir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(self.workdir, 0o755)
            for name in os.listdir(self.db_dir):
                os.chown(os.path.join(self.db_dir, name), pw.pw_uid, pw.pw_gid)
        with open(self.conf_path, "w") as f:
            for k, v in lines.items():
                f.write("%s %s\n" % (k, v))

    def start(self):
        binary = clamd_binary()
        if not binary:
            raise ClamdError("clamd is not installed (apt-get install clamav-daemon)")
        last = None
        for _attempt in range(3):     # the free port may be taken in between
            self._write_config()
            with open(os.path.join(self.workdir, "clamd.out"), "ab") as out:
                self.proc = subprocess.Popen(
                    [binary, "--foreground", "--config-file=%s" % self.conf_path],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_ready()
                return self
            except ClamdError as e:
                last = e
                self.stop()
        raise last

    def _wait_ready(self):
        deadline = time.monotonic() + self.start_timeout
        delay = 0.01
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClamdError("clamd exited with %s: %s" % (self.proc.returncode, self.log_tail()))
            if ping_unix(self.unix_path) and ping_tcp("127.0.0.1", self.tcp_port):
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        raise ClamdError("clamd gave no PONG within %ss: %s" % (self.start_timeout, self.log_tail()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL):
        """Send sig to clamd (by PID) without waiting."""
        if self.alive():
            os.kill(self.proc.pid, sig)

    def stop(self, timeout=10.0):
        """Stop clamd by its PID: SIGTERM, then SIGKILL after timeout."""
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout)
            except ProcessLookupError:
                pass
        try:
            os.unlink(self.unix_path)
        except OSError:
            pass

    def log_tail(self, n=20):
        text = ""
        for p in (self.log_path, os.path.join(self.workdir, "clamd.out")):
            try:
                with open(p, "rb") as f:
                    text += f.read()[-4000:].decode("utf-8", "replace")
            except OSError:
                pass
        return "\n".join(text.splitlines()[-n:])

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Run a private clamd with the test signatures.")
    ap.add_argument("workdir")
    ap.add_argument("--small", action="store_true", help="32K stream/file limits")
    ap.add_argument("--limit", action="append", default=[], metavar="KEY=VALUE",
                    help="override a clamd limit, e.g. StreamMaxLength=2000M")
    args = ap.parse_args(argv)
    limits = dict(SMALL_LIMITS if args.small else DEFAULT_LIMITS)
    for kv in args.limit:
        k, _, v = kv.partition("=")
        limits[k] = v
    c = Clamd(args.workdir, limits=limits).start()
    print("clamd pid %d: %s" % (c.pid, " ".join(c.endpoints)), flush=True)
    try:
        c.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    main()
