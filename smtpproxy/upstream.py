"""The upstream MTA: `sendmail:ARGV` over pipes or `smtp:HOST:PORT`.

Both speak SMTP; the proxy is their client.  sendmail: the argv comes from
the configuration (shlex-split, no shell), {client_addr} and {client_port}
are filled in per connection by plain string replacement (never format(),
never a shell), the environment is minimal and stderr goes to /dev/null
(under inetd our own stderr is the client's socket).  smtp: a TCP
connection with TCP_NODELAY.

Every read and write has a deadline (select on non-blocking fds): a hung
upstream can delay a client but never hang the proxy.  UpstreamError
means the upstream is unusable (unreachable, died, garbled, timed out):
the caller answers 421 and closes; nothing is reported as delivered.

What this module does not do: decide anything, or wait for the reply to
QUIT (exim answers it ~200 ms late; the message was safe at its 250).
"""

import errno
import os
import select
import time

MAX_REPLY_LINES = 100
MAX_REPLY_LINE = 2048
BLOCK = 1 << 16
SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C", "LC_ALL": "C"}


class UpstreamError(Exception):
    pass


def fill_placeholders(argv, client_addr, client_port):
    addr = client_addr or "0.0.0.0"
    port = str(client_port or 0)
    return [a.replace("{client_addr}", addr).replace("{client_port}", port) for a in argv]


class Upstream:
    def __init__(self, spec, client_addr="", client_port=0, timeout=300.0, connect_timeout=30.0):
        self.spec = spec
        self.client_addr, self.client_port = client_addr, client_port
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.kind = "sendmail" if spec.startswith("sendmail:") else "smtp"
        self.proc = None
        self.sock = None
        self.rfd = self.wfd = None
        self.buf = b""
        self.last = time.monotonic()
        self.greeting = None
        self.alive = False
        self.trace = None           # a logger when the dialogue is logged (debug)

    # -- start and stop --------------------------------------------------------
    def start(self):
        """Spawn or connect and read the greeting; UpstreamError if it is
        not a 220."""
        try:
            if self.kind == "sendmail":
                self._spawn()
            else:
                self._connect()
        except OSError as e:
            raise UpstreamError("cannot start %s: %s" % (self.spec, e))
        self.alive = True
        code, lines = self._traced(self.reply(self.connect_timeout + self.timeout))
        self.greeting = (code, lines)
        if code != 220:
            self.close()
            raise UpstreamError("upstream greeted %d %s" % (code, " ".join(lines)[:200]))
        return code, lines

    def _spawn(self):
        import shlex
        import subprocess
        argv = fill_placeholders(shlex.split(self.spec[len("sendmail:"):]),
                                 self.client_addr, self.client_port)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=dict(SAFE_ENV),
                                     close_fds=True, cwd="/")
        self.rfd = self.proc.stdout.fileno()
        self.wfd = self.proc.stdin.fileno()
        os.set_blocking(self.rfd, False)
        os.set_blocking(self.wfd, False)

    def _connect(self):
        import socket
        from scanlib.config import split_hostport
        host, port = split_hostport(self.spec[len("smtp:"):], 25)
        try:
            import ipaddress
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            family = None
        if family is None:
            s = socket.create_connection((host, port), timeout=self.connect_timeout)
        else:
            # An address literal: no resolver, no IDNA codec (every connection pays for imports).
            s = socket.socket(family, socket.SOCK_STREAM)
            try:
                s.settimeout(self.connect_timeout)
                s.connect((host, port))
            except OSError:
                s.close()
                raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        self.sock = s
        self.rfd = self.wfd = s.fileno()

    def quit(self):
        """QUIT without waiting for the answer, then close."""
        if self.alive:
            if self.trace is not None:
                self._trace_command(b"QUIT")
            try:
                os.write(self.wfd, b"QUIT\r\n")
            except OSError:
                pass
        self.close()

    def close(self):
        self.alive = False
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            # Not waited for: it finishes its delivery and exits on its own
            # (the message was safe at its 250); the kernel reaps it when we exit.
            self.proc = None

    # -- I/O -------------------------------------------------------------------
    def send(self, data, deadline=None):
        if not self.alive:
            raise UpstreamError("upstream is gone")
        deadline = deadline or (time.monotonic() + self.timeout)
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
                view = view[n:]
                continue
            except BlockingIOError:
                pass
            except OSError as e:
                self.close()
                raise UpstreamError("upstream write failed: %s" % e)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.wfd], [], left)[1]:
                self.close()
                raise UpstreamError("upstream write timed out")
        self.last = time.monotonic()

    def reply(self, timeout=None, deadline=None):
        """(code, [text lines]) of the next reply."""
        if deadline is None:
            deadline = time.monotonic() + (timeout or self.timeout)
        lines = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > MAX_REPLY_LINE:
                    self.close()
                    raise UpstreamError("upstream reply line too long")
                self._read(deadline)
                continue
            line, self.buf = self.buf[:i + 1].rstrip(b"\r\n"), self.buf[i + 1:]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-") \
                    or not b"200" <= line[:3] <= b"599":
                self.close()
                raise UpstreamError("garbled upstream reply %r" % line[:80])
            code = int(line[:3])
            if lines and code != lines[0][0]:
                self.close()
                raise UpstreamError("upstream reply changed code mid-reply")
            lines.append((code, line[4:].decode("utf-8", "replace")))
            if len(lines) > MAX_REPLY_LINES:
                self.close()
                raise UpstreamError("upstream reply too long")
            if line[3:4] != b"-":
                self.last = time.monotonic()
                return code, [t for _, t in lines]

    def _read(self, deadline):
        if not self.alive:
            raise UpstreamError("upstream is gone")
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.rfd], [], [], left)[0]:
                self.close()
                raise UpstreamError("upstream timed out")
            try:
                data = os.read(self.rfd, BLOCK)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self.close()
                raise UpstreamError("upstream read failed: %s" % e)
            if not data:
                self.close()
                raise UpstreamError("upstream closed the connection")
            self.buf += data
            return

    def command(self, data, timeout=None):
        if self.trace is not None:
            self._trace_command(data)
        self.send(data)
        return self._traced(self.reply(timeout))

    def _trace_command(self, data):
        from smtpproxy.replies import shown
        self.trace.debug("P> %s", shown(data))

    def _traced(self, result):
        """Log the reply (code, lines) as U< lines when tracing; returns it."""
        if self.trace is not None:
            from smtpproxy.replies import shown
            code, lines = result
            for i, text in enumerate(lines):
                self.trace.debug("U< %03d%s%s", code, "-" if i < len(lines) - 1 else " ",
                                 shown(text))
        return result

    def keepalive(self, interval):
        """NOOP a TCP upstream that has been idle for interval seconds (so
        that it does not time out while a long body arrives or is scanned)."""
        if self.alive and self.kind == "smtp" and time.monotonic() - self.last >= interval:
            self.command(b"NOOP\r\n")

    def data(self, head, f, deadline):
        """DATA with head (bytes, prepended headers) and the unstuffed
        content of file f, dot-stuffed on the way; the final reply."""
        from smtpproxy.datareader import stuff
        if self.trace is not None:
            self._trace_command(b"DATA")
        self.send(b"DATA\r\n", deadline)
        code, lines = self._traced(self.reply(deadline=deadline))
        if code != 354:
            return code, lines
        self.send(stuff(head), deadline)
        f.seek(0)
        carry = b""
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            block = carry + block
            cut = block.rfind(b"\r\n") + 2
            if cut < 2:
                carry = block
                continue
            carry = block[cut:]
            self.send(stuff(block[:cut]), deadline)
        if carry:
            # A last line without CRLF (cannot come from our DATA reader, but a
            # rewritten part could end so): complete it.
            self.send(stuff(carry + b"\r\n"), deadline)
        self.send(b".\r\n", deadline)
        if self.trace is not None:          # the content itself is never logged
            self.trace.debug("P> (message content, %d bytes of headers added, not shown)",
                             len(head))
            self._trace_command(b".")
        return self._traced(self.reply(deadline=deadline))
