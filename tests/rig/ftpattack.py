"""A scripted, hostile FTP server for the attack tests (tests/test_ftp_attacks.py).

HostileFtpd runs in threads of the test process on a free loopback port and
speaks just enough FTP for the proxy (USER PASS TYPE EPSV PASV RETR STOR APPE
NOOP FEAT QUIT ABOR); every reply can be replaced and RETR/STOR can be
scripted, so that a test can make the server lie (a 227 naming another
host), send hostile multi-line text, go silent after 150, or die in the
middle of a transfer.  It records what it saw (command lines, control
connections, data-connection peers) so that tests can check what the proxy
did on its side.  Stopped by stop(): every socket it opened is closed.

Trap(host, port=0) is a listener that only counts connections: a bounce
target that must never be reached.
"""

import select
import socket
import threading
import time


class Trap:
    """Counts connections to (host, port); never answers."""

    def __init__(self, host="127.0.0.1", port=0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = []
        self._stop = False
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self):
        while not self._stop:
            try:
                r, _, _ = select.select([self.sock], [], [], 0.2)
            except (OSError, ValueError):
                return
            if r:
                try:
                    c, peer = self.sock.accept()
                except OSError:
                    return
                self.hits.append(peer)
                c.close()

    def close(self):
        self._stop = True
        self._th.join(5)
        self.sock.close()


class Conn:
    """One control connection of HostileFtpd, as seen by a script."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.buf = b""
        self.listener = None

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def readline(self, timeout=30):
        deadline = time.monotonic() + timeout
        while b"\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return None
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        self.server.seen.append(line)
        return line

    def open_listener(self):
        if self.listener is not None:
            self.listener.close()
        self.listener = socket.socket()
        self.listener.bind((self.server.host, self.server.data_port or 0))
        self.listener.listen(1)
        self.listener.settimeout(20)
        return self.listener.getsockname()[1]

    def accept_data(self):
        conn, peer = self.listener.accept()
        self.server.data_peers.append(peer)
        self.listener.close()
        self.listener = None
        return conn

    def close(self):
        for s in (self.listener, self.sock):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass


def _recv_all(sock):
    out = []
    sock.settimeout(20)
    while True:
        try:
            d = sock.recv(65536)
        except OSError:
            break
        if not d:
            break
        out.append(d)
    sock.close()
    return b"".join(out)


class HostileFtpd:
    """files: {name bytes: content}; replies: {VERB: raw reply bytes} that
    replace the normal answer; epsv: answer EPSV (else 502, forcing PASV);
    pasv_host: the address named in 227 replies (a liar names another);
    data_port: bind passive listeners to this port (a trap elsewhere may
    hold the same number); on_retr/on_stor(conn, name): scripts that own the
    whole transfer, replies included."""

    def __init__(self, files=None, replies=None, epsv=True, pasv_host="127.0.0.1",
                 data_port=0, on_retr=None, on_stor=None, host="127.0.0.1"):
        self.files = dict(files or {})
        self.replies = dict(replies or {})
        self.epsv = epsv
        self.pasv_host = pasv_host
        self.data_port = data_port
        self.on_retr = on_retr
        self.on_stor = on_stor
        self.host = host
        self.seen = []               # every command line received
        self.connections = []        # peers of control connections
        self.data_peers = []
        self.conns = []
        self.lst = socket.socket()
        self.lst.bind((host, 0))
        self.lst.listen(16)
        self.port = self.lst.getsockname()[1]
        self._stop = False
        self._th = threading.Thread(target=self._accept, daemon=True)
        self._th.start()

    def _accept(self):
        while not self._stop:
            try:
                r, _, _ = select.select([self.lst], [], [], 0.2)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                s, peer = self.lst.accept()
            except OSError:
                return
            self.connections.append(peer)
            c = Conn(self, s)
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.send(self.replies.get("GREETING", b"220 hostile test server\r\n"))
            while not self._stop:
                line = c.readline(timeout=60)
                if line is None:
                    return
                verb, _, arg = line.partition(b" ")
                verb = verb.upper().decode("ascii", "replace")
                if verb in self.replies:
                    c.send(self.replies[verb])
                    continue
                if verb == "QUIT":
                    c.send(b"221 bye\r\n")
                    return
                if not self._dispatch(c, verb, arg):
                    return
        except OSError:
            pass
        finally:
            c.close()

    def _dispatch(self, c, verb, arg):
        simple = {"USER": b"331 password please\r\n", "PASS": b"230 logged in\r\n",
                  "TYPE": b"200 type ok\r\n", "NOOP": b"200 noop\r\n",
                  "FEAT": b"211 no features\r\n", "ABOR": b"225 no transfer\r\n",
                  "PWD": b'257 "/" is cwd\r\n', "SYST": b"215 UNIX Type: L8\r\n"}
        if verb in simple:
            c.send(simple[verb])
        elif verb == "EPSV":
            if not self.epsv:
                c.send(b"502 no EPSV here\r\n")
            else:
                c.send(b"229 Entering Extended Passive Mode (|||%d|)\r\n" % c.open_listener())
        elif verb == "PASV":
            port = c.open_listener()
            c.send(b"227 Entering Passive Mode (%s,%d,%d)\r\n"
                   % (self.pasv_host.replace(".", ",").encode(), port >> 8, port & 255))
        elif verb == "RETR":
            if self.on_retr is not None:
                return self.on_retr(c, arg) is not False
            if arg not in self.files:
                c.send(b"550 no such file\r\n")
                return True
            c.send(b"150 here it comes\r\n")
            d = c.accept_data()
            d.sendall(self.files[arg])
            d.close()
            c.send(b"226 done\r\n")
        elif verb in ("STOR", "APPE"):
            if self.on_stor is not None:
                return self.on_stor(c, arg) is not False
            c.send(b"150 send it\r\n")
            data = _recv_all(c.accept_data())
            self.files[arg] = (self.files.get(arg, b"") if verb == "APPE" else b"") + data
            c.send(b"226 stored\r\n")
        else:
            c.send(b"502 not here\r\n")
        return True

    def stop(self):
        self._stop = True
        self._th.join(5)
        self.lst.close()
        for c in self.conns:
            c.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
