"""The proxy's leg to the FTP server: selection, control connection, data
connections.

Three upstream modes ([ftp] upstream):
  userhost        the client names the server: USER name@host[:port].  The
                  host is resolved once and the connection goes to exactly
                  the address that was checked: allowed_upstreams (host
                  globs, IP networks, each with an optional :port; port 21
                  unless the entry names another; empty = nothing) must
                  allow it, and a client outside [networks] inside never
                  reaches an inside, loopback, link-local or otherwise
                  non-public address, whatever allowed_upstreams says.
  tcp:HOST:PORT   one fixed server.
  command:ARGV    an ftpd spawned in inetd mode (no shell, stderr to
                  /dev/null) with one end of a loopback TCP connection as its
                  stdin/stdout: vsftpd refuses a unix socketpair.  It is
                  spawned before the proxy drops privileges.

Data connections to the server are always the proxy's own, in passive
mode (EPSV, then PASV if the server refuses EPSV), to the server's control
address: the address in a 227 reply is never used (it may name another
host, RFC 2577).

The server's replies must answer the proxy's commands one for one: a
reply (or part of one) already waiting when a command is about to be sent,
a reply to EPSV/PASV other than 229/227/5xx, or a 2xx/3xx to a transfer
command (where only 1xx, 4xx or 5xx can come first) is a protocol error
(UpstreamError: the client gets 421 and the session ends), so an extra
reply can never be taken as the answer to a later command, such as a 226
for an upload the server never got.

Commands are sent with every 0xFF byte doubled (Telnet IAC IAC, RFC 854
and RFC 2640 3.1): a file name holding 0xFF (which the client sent as
IAC IAC, undone by the line reader) reaches the server as the same name.
"""

import fnmatch
import ipaddress
import os
import select
import socket
import time

from ftpproxy import addr as _addr
from ftpproxy.replies import ReplyParser, ReplyError
from scanlib import net


class UpstreamError(Exception):
    """The server cannot be reached or broke the protocol: 421."""


class Denied(Exception):
    """userhost target refused by policy: 530."""


BIG = 1 << 20


def nodelay(sock):
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


def big_buffers(sock):
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * BIG)
        except OSError:
            pass


# -- userhost policy ------------------------------------------------------------

def parse_allowed(entry):
    """One allowed_upstreams entry -> (kind, value, port): kind 'net' with an
    ip_network, or 'glob' with a lower-case host pattern."""
    e = entry.strip()
    port = 21
    if e.startswith("["):
        end = e.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in %r" % entry)
        host, rest = e[1:end], e[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError("bad port in %r" % entry)
            port = int(rest[1:])
    elif e.count(":") == 1:
        host, p = e.split(":")
        if not p.isdigit():
            raise ValueError("bad port in %r" % entry)
        port = int(p)
    else:
        host = e
    if not 0 < port < 65536:
        raise ValueError("bad port in %r" % entry)
    try:
        return ("net", ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        pass
    if not host:
        raise ValueError("empty entry")
    return ("glob", host.lower().rstrip("."), port)


def check_target(name, address, port, allowed, client, inside):
    """Raise Denied unless (name resolved to address, port) may be reached by
    client.  inside: scanlib.net.Networks."""
    a = net.normalise(address)
    if client not in inside and not net.is_public_target(a, inside):
        raise Denied("%s is not reachable from outside" % a)
    lname = name.lower().rstrip(".")
    for entry in allowed:
        try:
            kind, value, eport = parse_allowed(entry)
        except ValueError:
            continue
        if eport != port:
            continue
        if kind == "net":
            if a.version == value.version and a in value:
                return
        elif fnmatch.fnmatchcase(lname, value):
            return
    raise Denied("%s (%s) port %d is not in allowed_upstreams" % (name, a, port))


def resolve(host, port, allowed, client, inside):
    """The first resolved address of host that policy allows, as a
    getaddrinfo sockaddr tuple with its family.  Raises Denied."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise Denied("cannot resolve %s: %s" % (host, e))
    why = None
    for family, _, _, _, sockaddr in infos:
        try:
            check_target(host, sockaddr[0], port, allowed, client, inside)
            return family, sockaddr
        except Denied as e:
            why = e
    raise why or Denied("no address for %s" % host)


def spawn_command(upstream, timeout):
    """command:ARGV -> Upstream on a freshly spawned inetd-mode ftpd."""
    import shlex
    argv = shlex.split(upstream[len("command:"):])
    up = Upstream.spawn(argv, timeout)
    up.name = os.path.basename(argv[0])
    return up


# -- the control connection -----------------------------------------------------

class Upstream:
    def __init__(self, sock, timeout=300.0, proc=None):
        self.sock = sock
        self.timeout = timeout
        self.proc = proc
        self.parser = ReplyParser()
        self.replies = []
        self.binary = False
        self.epsv_ok = True
        nodelay(sock)
        peer = sock.getpeername()
        self.peer = (net.normalise(peer[0]), peer[1])
        self.family = sock.family

    @classmethod
    def connect(cls, family, sockaddr, timeout, connect_timeout=20.0):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(connect_timeout)
        try:
            s.connect(sockaddr)
        except OSError as e:
            s.close()
            raise UpstreamError("cannot connect to %s port %s: %s"
                                % (sockaddr[0], sockaddr[1], e.strerror or e))
        s.settimeout(None)
        return cls(s, timeout)

    @classmethod
    def connect_name(cls, host, port, timeout, connect_timeout=20.0):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise UpstreamError("cannot resolve %s: %s" % (host, e))
        err = None
        for family, _, _, _, sockaddr in infos:
            try:
                return cls.connect(family, sockaddr, timeout, connect_timeout)
            except UpstreamError as e:
                err = e
        raise err

    @classmethod
    def spawn(cls, argv, timeout):
        """Start argv (an inetd-mode ftpd) on one end of a loopback TCP
        connection; returns the Upstream on the other end."""
        import subprocess
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            mine = socket.create_connection(lst.getsockname(), timeout=10)
            lst.settimeout(10)
            theirs, _ = lst.accept()
        finally:
            lst.close()
        try:
            proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                                    stderr=subprocess.DEVNULL, close_fds=True,
                                    start_new_session=True)
        except OSError as e:
            mine.close()
            raise UpstreamError("cannot start %s: %s" % (argv[0], e.strerror or e))
        finally:
            theirs.close()
        mine.settimeout(None)
        return cls(mine, timeout, proc)

    name = ""

    def fileno(self):
        return self.sock.fileno()

    def send(self, line, check=True):
        """Send one command.  check: first make sure the server has said
        nothing unasked (see the module docstring); abort_upstream turns it
        off, since the replies of the transfer it stops may be on their way."""
        if check:
            self.check_quiet()
        try:
            self.sock.sendall(line.replace(b"\xff", b"\xff\xff") + b"\r\n")
        except OSError as e:
            raise UpstreamError("lost the server: %s" % (e.strerror or e))

    def pending(self):
        return bool(self.replies)

    def check_quiet(self):
        """UpstreamError if the server sent anything not yet asked for."""
        if not self.replies and not self.parser.buf and not self.parser.pending:
            r, _, _ = select.select([self.sock], [], [], 0)
            if r:
                self.read_some()
        if self.replies or self.parser.buf or self.parser.pending:
            what = (self.replies[0].lines[0] if self.replies else
                    (self.parser.pending[0] if self.parser.pending else self.parser.buf))
            raise UpstreamError("server protocol error: unsolicited reply %r" % bytes(what[:80]))

    def transfer_command(self, line):
        """Send RETR/STOR/LIST...; the reply is 1xx (go ahead) or a 4xx/5xx
        refusal.  A 2xx or 3xx here is a protocol error."""
        r = self.command(line)
        if 200 <= r.code < 400:
            raise UpstreamError("server protocol error: %d in answer to a transfer command"
                                % r.code)
        return r

    def read_some(self):
        """Read what is there (the caller saw the socket readable)."""
        try:
            data = self.sock.recv(65536)
        except OSError as e:
            raise UpstreamError("lost the server: %s" % (e.strerror or e))
        if not data:
            raise UpstreamError("the server closed the connection")
        try:
            self.replies.extend(self.parser.feed(data))
        except ReplyError as e:
            raise UpstreamError("server protocol error: %s" % e)

    def reply(self, timeout=None):
        """The next whole reply; UpstreamError on timeout or loss."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise UpstreamError("the server did not answer in time")
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                self.read_some()
        return self.replies.pop(0)

    def final_reply(self, timeout=None):
        """Skip preliminary (1xx) replies."""
        while True:
            r = self.reply(timeout)
            if r.code >= 200:
                return r

    def command(self, line, timeout=None):
        self.send(line)
        return self.reply(timeout)

    def greeting(self):
        r = self.final_reply()
        if r.code != 220:
            raise UpstreamError("server refused the connection: %d %s" % (r.code, r.text))
        return r

    def ensure_binary(self):
        if not self.binary:
            r = self.command(b"TYPE I")
            if r.code != 200:
                raise UpstreamError("server refused TYPE I: %d %s" % (r.code, r.text))
            self.binary = True

    def open_data(self, connect_timeout=20.0):
        """A data connection to the server in passive mode; returns
        (socket or None, error Reply or None)."""
        port = None
        if self.epsv_ok:
            r = self.command(b"EPSV")
            if r.code == 229:
                try:
                    port = _addr.parse_epsv_reply(r.text)
                except _addr.AddrError as e:
                    raise UpstreamError(e.text)
            elif not 500 <= r.code < 600:
                raise UpstreamError("server protocol error: %d in answer to EPSV" % r.code)
            elif self.family == socket.AF_INET:
                self.epsv_ok = False
            else:
                return None, r
        if port is None:
            r = self.command(b"PASV")
            if r.code != 227 and not 500 <= r.code < 600:
                raise UpstreamError("server protocol error: %d in answer to PASV" % r.code)
            if r.code != 227:
                return None, r
            try:
                port = _addr.parse_pasv_reply(r.text)
            except _addr.AddrError as e:
                raise UpstreamError(e.text)
        host = self.sock.getpeername()[0]
        s = socket.socket(self.family, socket.SOCK_STREAM)
        big_buffers(s)
        s.settimeout(connect_timeout)
        try:
            s.connect((host, port))
        except OSError as e:
            s.close()
            raise UpstreamError("cannot open a data connection to the server: %s"
                                % (e.strerror or e))
        s.settimeout(None)
        return s, None

    def close(self, quit=True):
        if quit:
            try:
                self.sock.sendall(b"QUIT\r\n")
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=2)
            except Exception:
                try:
                    self.proc.kill()
                    self.proc.wait(timeout=2)
                except Exception:
                    pass
