"""FTP servers and a raw client for the tests: pyftpdlib in a subprocess,
vsftpd for command:, Raw (exact control bytes, whole replies).

PyFtpd(root)   a pyftpdlib server on a free loopback port (IPv4, IPv6 or
               dual-stack), user 'user'/'secret' with full rights on root
               and anonymous read-only; started as its own process (not a
               thread: a 200 MB transfer must not share the test's GIL) and
               stopped by PID.  .host .port .pid .root
vsftpd_config(directory) -> (path, anon_root)  a vsftpd.conf for inetd mode
               (listen=NO), anonymous with a writable incoming/ folder,
               suitable for `command:/usr/sbin/vsftpd CONF`.
"""

import os
import signal
import socket
import subprocess
import sys
import time


USER, PASSWORD = "user", "secret"

_SERVER = r'''
import sys, logging
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
root, host, port, lo, hi = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
masquerade, no_epsv = sys.argv[6], sys.argv[7] == "1"
logging.basicConfig(level=logging.WARNING)
a = DummyAuthorizer()
a.add_user("user", "secret", root, perm="elradfmwMT")
a.add_anonymous(root)
class H(FTPHandler):
    if no_epsv:
        def ftp_EPSV(self, line):
            self.respond("502 EPSV disabled for this test.")
if masquerade:
    H.masquerade_address = masquerade
H.authorizer = a
H.passive_ports = range(lo, hi + 1)
H.permit_foreign_addresses = True
H.banner = "pyftpdlib test server ready"
H.timeout = 120
H.ac_in_buffer_size = 1 << 20
H.ac_out_buffer_size = 1 << 20
s = FTPServer((host, port), H)
s.max_cons = 256
print("READY", s.socket.getsockname()[1], flush=True)
s.serve_forever()
'''


def _free_range(n=50):
    """A base for n passive ports (random in a high range; collisions with
    other tests are tolerated by the servers, which try the next)."""
    import random
    base = random.randrange(40000, 60000 - n)
    return base, base + n - 1


class PyFtpd:
    def __init__(self, root, host="127.0.0.1", masquerade="", no_epsv=False):
        """masquerade: the address its 227 replies name (a lying server);
        no_epsv: refuse EPSV (clients must fall back to PASV)."""
        self.root = str(root)
        self.host = host
        self.masquerade = masquerade
        self.no_epsv = no_epsv
        self.port = None
        self.proc = None

    def start(self):
        lo, hi = _free_range()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER, self.root, self.host, "0", str(lo), str(hi),
             self.masquerade, "1" if self.no_epsv else "0"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        line = self.proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError("pyftpdlib did not start")
        self.port = int(line.split()[1])
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        if self.proc is None:
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


VSFTPD = "/usr/sbin/vsftpd"


def vsftpd_config(directory, pasv=(31000, 31049)):
    """A vsftpd.conf for inetd mode under directory; returns (conf, anon_root).
    anon_root is root-owned and not writable (vsftpd insists); incoming/ in
    it belongs to the ftp user and takes anonymous uploads."""
    import pwd
    directory = str(directory)
    anon = os.path.join(directory, "anon")
    incoming = os.path.join(anon, "incoming")
    empty = os.path.join(directory, "empty")
    for d in (anon, incoming, empty):
        os.makedirs(d, exist_ok=True)
    os.chmod(directory, 0o755)
    os.chmod(anon, 0o755)
    os.chmod(empty, 0o755)
    try:
        ftp = pwd.getpwnam("ftp")
        os.chown(incoming, ftp.pw_uid, ftp.pw_gid)
    except KeyError:
        pass
    os.chmod(incoming, 0o777)
    conf = os.path.join(directory, "vsftpd.conf")
    with open(conf, "w") as f:
        f.write("\n".join([
            "listen=NO", "listen_ipv6=NO", "anonymous_enable=YES", "local_enable=NO",
            "write_enable=YES", "anon_upload_enable=YES", "anon_mkdir_write_enable=NO",
            "anon_other_write_enable=YES", "anon_world_readable_only=NO",
            "anon_root=%s" % anon, "no_anon_password=YES",
            "pasv_enable=YES", "pasv_min_port=%d" % pasv[0], "pasv_max_port=%d" % pasv[1],
            "pasv_address=127.0.0.1", "seccomp_sandbox=NO",
            "secure_chroot_dir=%s" % empty, "xferlog_enable=NO", "syslog_enable=NO",
            "vsftpd_log_file=%s" % os.path.join(directory, "vsftpd.log"),
            "dual_log_enable=NO", "connect_from_port_20=NO", "anon_umask=022",
            "file_open_mode=0644", ""]))
    os.chmod(conf, 0o600)
    return conf, anon



class Raw:
    def __init__(self, host, port, timeout=20, source=None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.buf = b""
        self.timeout = timeout

    def _line(self):
        deadline = time.monotonic() + self.timeout
        while b"\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply line")
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed; partial %r" % self.buf)
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def reply(self):
        """(code, [lines]) of the next whole reply."""
        first = self._line()
        lines = [first]
        if first[3:4] == "-":
            code = first[:3]
            while True:
                line = self._line()
                lines.append(line)
                if line[:3] == code and line[3:4] == " ":
                    break
        return int(first[:3]), lines

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line):
        self.send(line + "\r\n" if isinstance(line, str) else line + b"\r\n")
        return self.reply()

    def login(self, user="user", password="secret"):
        code, lines = self.reply()
        assert code == 220, lines
        code, lines = self.cmd("USER " + user)
        if code == 331:
            code, lines = self.cmd("PASS " + password)
        assert code == 230, lines
        return code

    def pasv_port(self):
        code, lines = self.cmd("EPSV")
        assert code == 229, lines
        text = lines[-1]
        return int(text[text.index("(|||") + 4:text.index("|)")])

    def data_connect(self, port):
        host = self.sock.getpeername()[0]
        s = socket.create_connection((host, port), timeout=self.timeout)
        return s

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def recv_all(sock, timeout=20):
    sock.settimeout(timeout)
    out = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not data:
            break
        out.append(data)
    sock.close()
    return b"".join(out)
