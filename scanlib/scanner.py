"""The clamd scanner: hand a spooled file to clamd, get a Verdict.

Scanner(endpoints, method, timeout, connect_timeout, max_size).scan_file(x)
returns Clean, Infected(names) or Unscannable(reason, detail), and never
raises.  x is a real binary file (e.g. from Spool.create(), flushed here),
a file descriptor or a path.

Endpoints are `unix:PATH`, `tcp:HOST:PORT` or `tcp:[V6]:PORT`, tried in
order: a dead endpoint (refused, missing socket, accept queue full past the
connect timeout, connection lost before any reply) moves on to the next one.
One connection per scan, always closed.  The scan timeout is one deadline for
the whole scan, failover included: never multiplied by retries.

Methods, per endpoint:
  fildes  zFILDES + the open descriptor over the unix socket (SCM_RIGHTS):
          clamd needs no permission on our files, the file may be unlinked,
          StreamMaxLength does not apply (MaxFileSize does).  On a tcp
          endpoint, where no descriptor can travel, stream is used instead.
  stream  zINSTREAM, 1 MiB chunks read with pread and sent with sendall (the
          file is never in memory); after a broken pipe the reply is still
          read ("INSTREAM size limit exceeded" -> size-limit).
  path    zSCAN ABSPATH: clamd opens the file itself and needs permission.
          A file object without a usable path is streamed.
  auto    fildes on a unix endpoint, else stream.

What clamd hides is made explicit: items larger than max_size are
Unscannable('size-limit') without asking clamd; Heuristics.Limits.Exceeded.*
is size-limit and Heuristics.Encrypted.* encrypted, never viruses; an ERROR
reply, a timeout, a lost connection or an unreadable reply is
Unscannable('unavailable').  Clean only ever comes from an explicit OK.

pyclamd (imported when a scan happens, like threading) supplies the clamd
client class; PING and VERSION are its own methods.  Its sockets, reply
reader (5 retried recvs: a hung clamd blocked 5x the timeout), send() and
result parser (a path with ': ' split wrongly; ERROR looked like a virus) are
replaced here; FILDES and a proper INSTREAM are added.

This module does not decide what to do with a verdict (scanlib.policy does)
and does not log findings (the proxies' summary lines do); it logs failover
and errors at debug/warning level on the 'virusgw' logger.
"""

import os

from scanlib.verdict import (Clean, Infected, Unscannable, strongest,
                             UNAVAILABLE, SIZE_LIMIT, ENCRYPTED)

METHODS = ("auto", "fildes", "stream", "path")
CHUNK = 1 << 20                 # INSTREAM chunk: large, few syscalls, bounded memory
MAX_REPLY = 1 << 20             # a clamd reply longer than this is not believed
DEFAULT_PARALLEL = 4

_SIZE_LIMIT_PREFIX = "Heuristics.Limits.Exceeded"
_ENCRYPTED_PREFIX = "Heuristics.Encrypted"


class _Failover(Exception):
    """This endpoint could not be used; try the next (detail in args[0])."""


class _Timeout(Exception):
    """The scan deadline passed."""


def _monotonic():
    import time
    return time.monotonic()


# -- result text -------------------------------------------------------------

def _printable(text):
    """Controls (CR, LF, NUL, ...) as '?': the text goes into protocol replies."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def verdict_line(name, verdict, detail=False, internal=False):
    """clamd-style result text: 'name: OK', 'name: A, B FOUND',
    'name: size-limit ERROR' (with detail: 'name: size-limit (why) ERROR').
    Control characters in name or detail become '?' (the line is echoed to
    clients in SMTP/FTP replies).  The why of an outage (unavailable) names
    our clamd sockets and addresses: it is shown only with internal=True
    (the administrator's CLI), never to a network client."""
    name = _printable(name)
    if isinstance(verdict, Infected):
        return "%s: %s FOUND" % (name, _printable(", ".join(verdict.names)))
    if isinstance(verdict, Unscannable):
        if verdict.reason == UNAVAILABLE and not internal:
            detail = False
        if detail and verdict.detail:
            return "%s: %s (%s) ERROR" % (name, verdict.reason, _printable(verdict.detail))
        return "%s: %s ERROR" % (name, verdict.reason)
    if isinstance(verdict, Clean):
        return "%s: OK" % name
    return "%s: unknown ERROR" % name


def parse_reply(lines):
    """Verdict from clamd's reply lines (prefix 'stream: ', 'fd[N]: ' or a
    path, which may itself hold ': ').  Virus names never hold spaces, so a
    FOUND line's name is the last word before FOUND.  No line, or a line of
    no known shape, is Unscannable('unavailable'); Clean needs an OK."""
    verdicts = []
    for raw in lines:
        text = raw.strip()
        if not text:
            continue
        if text == "OK" or text.endswith(": OK"):
            verdicts.append(Clean())
        elif text.endswith(" FOUND"):
            name = text[:-6].rstrip().rsplit(" ", 1)[-1]
            if name.startswith(_SIZE_LIMIT_PREFIX):
                verdicts.append(Unscannable(SIZE_LIMIT, name))
            elif name.startswith(_ENCRYPTED_PREFIX):
                verdicts.append(Unscannable(ENCRYPTED, name))
            elif name and not name.endswith(":"):
                verdicts.append(Infected([name]))
            else:
                verdicts.append(Unscannable(UNAVAILABLE, "unexpected reply: %s" % text[:200]))
        elif text.endswith(" ERROR") or text == "ERROR":
            msg = text[:-5].rstrip()
            if ": " in msg and not msg.startswith("INSTREAM"):
                msg = msg.rsplit(": ", 1)[-1]
            if "size limit exceeded" in msg.lower():
                verdicts.append(Unscannable(SIZE_LIMIT, msg))
            else:
                verdicts.append(Unscannable(UNAVAILABLE, "clamd: %s" % (msg or "ERROR")))
        else:
            verdicts.append(Unscannable(UNAVAILABLE, "unexpected reply: %s" % text[:200]))
    if not verdicts:
        return Unscannable(UNAVAILABLE, "no reply from clamd")
    return strongest(verdicts)


# -- connections -------------------------------------------------------------

def _connect(endpoint, connect_timeout, deadline):
    """A connected socket to endpoint (a parse_endpoint tuple), or _Failover.
    A unix connect to a full accept queue fails at once with EAGAIN: retry
    (short, growing pauses) until the connect timeout."""
    import socket
    import time
    limit = min(_monotonic() + connect_timeout, deadline)
    if endpoint[0] == "unix":
        path = endpoint[1]
        pause = 0.005
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            left = limit - _monotonic()
            if left <= 0:
                s.close()
                raise _Failover("connect %s: timed out" % path)
            s.settimeout(left)
            try:
                s.connect(path)
                return s
            except BlockingIOError:
                s.close()       # EAGAIN: the listen queue is full
                if _monotonic() + pause >= limit:
                    raise _Failover("connect %s: accept queue full (EAGAIN) for %gs"
                                    % (path, connect_timeout))
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
            except socket.timeout:
                s.close()
                raise _Failover("connect %s: timed out" % path)
            except OSError as e:
                s.close()
                raise _Failover("connect %s: %s" % (path, e.strerror or e))
    host, port = endpoint[1], endpoint[2]
    left = limit - _monotonic()
    if left <= 0:
        raise _Failover("connect [%s]:%d: timed out" % (host, port))
    try:
        return socket.create_connection((host, port), timeout=left)
    except socket.timeout:
        raise _Failover("connect [%s]:%d: timed out" % (host, port))
    except OSError as e:
        raise _Failover("connect [%s]:%d: %s" % (host, port, e.strerror or e))


_SESSION_CLASS = None


def _session_class():
    """pyclamd's client class with our socket handling (built on first use:
    pyclamd is imported only when clamd is actually asked something)."""
    global _SESSION_CLASS
    if _SESSION_CLASS is not None:
        return _SESSION_CLASS
    from pyclamd.pyclamd import _ClamdGeneric

    class Session(_ClamdGeneric):
        """One connection to one endpoint, bounded by one deadline."""

        def __init__(self, endpoint, connect_timeout, deadline):
            _ClamdGeneric.__init__(self)
            self.endpoint = endpoint
            self.connect_timeout = connect_timeout
            self.deadline = deadline
            self.clamd_socket = None
            self.replied = False

        # pyclamd's hooks ----------------------------------------------------
        def _init_socket(self):
            self._close_socket()
            self.clamd_socket = _connect(self.endpoint, self.connect_timeout, self.deadline)

        def _send_command(self, cmd):
            # 'z' commands end in NUL: a path may hold a newline.
            if isinstance(cmd, str):
                cmd = cmd.encode("utf-8", "surrogateescape")
            self.send(b"z" + cmd + b"\0")

        def _recv_response(self):
            return "\n".join(self.read_reply())

        def _close_socket(self):
            s, self.clamd_socket = self.clamd_socket, None
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass

        # ours -----------------------------------------------------------------
        def _arm(self):
            left = self.deadline - _monotonic()
            if left <= 0:
                raise _Timeout()
            self.clamd_socket.settimeout(left)

        def send(self, data):
            import socket
            self._arm()
            try:
                self.clamd_socket.sendall(data)
            except socket.timeout:
                raise _Timeout()

        def read_reply(self):
            """Every NUL- or newline-terminated line until clamd closes
            (it does after each non-session command)."""
            import socket
            buf = bytearray()
            while True:
                self._arm()
                try:
                    chunk = self.clamd_socket.recv(65536)
                except socket.timeout:
                    raise _Timeout()
                except ConnectionResetError:
                    # clamd closed with our data unread (after a size limit):
                    # what it wrote before is the reply.
                    if buf:
                        break
                    raise
                if not chunk:
                    break
                self.replied = True
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise OSError("reply longer than %d bytes" % MAX_REPLY)
            text = bytes(buf).decode("utf-8", "replace")
            return [l for l in text.replace("\0", "\n").split("\n") if l.strip()]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._close_socket()
            return False

    _SESSION_CLASS = Session
    return Session


# -- the scanner -------------------------------------------------------------

class _Source:
    """What is being scanned: a descriptor (ours to close or borrowed), the
    absolute path if known, and the size."""

    def __init__(self, item):
        self.fd = None
        self.own = False
        self.ro_fd = None
        self.path = None
        self.fileobj = None
        self.consumed = False       # a pipe once read cannot be offered again
        if isinstance(item, int):
            self.fd = item
        elif isinstance(item, (str, bytes, os.PathLike)):
            path = os.fsdecode(item)
            self.path = os.path.abspath(path)
        else:
            self.fileobj = item
            flush = getattr(item, "flush", None)
            if flush is not None:
                flush()
            try:
                self.fd = item.fileno()
            except (AttributeError, OSError, ValueError):
                self.fd = None
            name = getattr(item, "name", None)
            if isinstance(name, (str, bytes)) and os.path.isabs(os.fsdecode(name)):
                self.path = os.fsdecode(name)

    def size(self):
        """Size in bytes (None when it cannot be known)."""
        if self.fd is not None:
            return os.fstat(self.fd).st_size
        if self.path is not None:
            return os.stat(self.path).st_size
        f = self.fileobj
        try:
            here = f.tell()
            end = f.seek(0, 2)
            f.seek(here)
            return end
        except (AttributeError, OSError, ValueError):
            return None

    def open_fd(self):
        """A readable descriptor (opening the path if we have only that)."""
        if self.fd is None and self.path is not None:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
                              | getattr(os, "O_CLOEXEC", 0))
            os.set_blocking(self.fd, True)
            self.own = True
            import stat
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                self.consumed = True        # a FIFO: one attempt only
        return self.fd

    def readonly_fd(self):
        """A descriptor for clamd: a read-only reopening of the caller's (via
        /proc/self/fd, which works for unlinked files too), so that clamd
        neither moves the caller's file offset nor gets write access."""
        if self.fd is not None and not self.own and self.ro_fd is None:
            try:
                self.ro_fd = os.open("/proc/self/fd/%d" % self.fd,
                                     os.O_RDONLY | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self.ro_fd = None
        if self.ro_fd is not None:
            return self.ro_fd
        return self.open_fd()

    def close(self):
        if self.ro_fd is not None:
            try:
                os.close(self.ro_fd)
            except OSError:
                pass
            self.ro_fd = None
        if self.own and self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
            self.own = False


class Scanner:
    """Scans files with clamd.  Thread-safe: every scan has its own
    connection and deadline."""

    def __init__(self, endpoints=("unix:/run/clamav/clamd.ctl",), method="auto", timeout=120,
                 connect_timeout=5, max_size=104857600, parallel=DEFAULT_PARALLEL):
        from scanlib.config import parse_endpoint
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if method not in METHODS:
            raise ValueError("method must be one of %s, not %r" % (", ".join(METHODS), method))
        self.endpoint_texts = list(endpoints)
        self.endpoints = [parse_endpoint(e) for e in self.endpoint_texts]
        if not self.endpoints:
            raise ValueError("at least one clamd endpoint is needed")
        self.method = method
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_size = int(max_size) if max_size else 0
        self.parallel = max(1, int(parallel or 1))
        self._version = None

    @classmethod
    def from_config(cls, section):
        """From the [scanner] section of a loaded Config."""
        return cls(endpoints=section["clamd"], method=section.get("method", "auto"),
                   timeout=section.get("timeout", 120),
                   connect_timeout=section.get("connect_timeout", 5),
                   max_size=section.get("max_size", 104857600),
                   parallel=section.get("parallel", DEFAULT_PARALLEL))

    def __repr__(self):
        return "Scanner(%r, method=%r)" % (self.endpoint_texts, self.method)

    # -- public ------------------------------------------------------------
    def scan_file(self, item):
        """Verdict for one file (file object, descriptor or path).  Never
        raises."""
        try:
            v = self._scan(item)
        except Exception as e:          # the contract: a scan never raises
            _log().warning("scanner: internal error: %r", e)
            return Unscannable(UNAVAILABLE, "internal error: %s" % e.__class__.__name__)
        if isinstance(v, Unscannable) and v.reason == UNAVAILABLE:
            # Clients are told only "scanner unavailable"; the why is here.
            _log().warning("scanner: unavailable: %s", v.detail or "-")
        return v

    def scan_many(self, items):
        """Verdicts for several files, in order, scanned over up to
        `parallel` connections at once."""
        items = list(items)
        if len(items) <= 1 or self.parallel == 1:
            return [self.scan_file(i) for i in items]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(items))) as pool:
            return list(pool.map(self.scan_file, items))

    def version(self):
        """clamd's VERSION reply ('ClamAV 1.4.6/DBVERSION/DATE'), '' when no
        endpoint answers.  Cached once known."""
        if self._version:
            return self._version
        deadline = _monotonic() + min(self.timeout, 10.0)
        for ep in self.endpoints:
            try:
                with _session_class()(ep, self.connect_timeout, deadline) as s:
                    v = s.version()
                if v:
                    self._version = _printable(v.strip())
                    return self._version
            except Exception as e:
                _log().debug("scanner: VERSION via %s failed: %r", _ep_text(ep), e)
        return ""

    def ping(self):
        """True when some endpoint answers PONG."""
        deadline = _monotonic() + min(self.timeout, 10.0)
        for ep in self.endpoints:
            try:
                with _session_class()(ep, self.connect_timeout, deadline) as s:
                    if s.ping():
                        return True
            except Exception:
                pass
        return False

    # -- inside --------------------------------------------------------------
    def _scan(self, item):
        start = _monotonic()
        deadline = start + self.timeout
        src = _Source(item)
        try:
            try:
                size = src.size()
            except OSError as e:
                return Unscannable(UNAVAILABLE, "cannot stat: %s" % (e.strerror or e))
            if self.max_size and size is not None and size > self.max_size:
                return Unscannable(SIZE_LIMIT, "%d bytes exceed max_size %d"
                                   % (size, self.max_size))
            problems = []
            for ep in self.endpoints:
                if _monotonic() >= deadline:
                    break
                if src.consumed:
                    # Streamed from a pipe to an endpoint that then failed:
                    # what is left would scan as an empty (clean) file.
                    problems.append("cannot resend a pipe to the next endpoint")
                    return Unscannable(UNAVAILABLE, "; ".join(problems))
                try:
                    return self._scan_at(ep, src, deadline)
                except _Failover as e:
                    problems.append(str(e))
                    _log().warning("scanner: %s unusable: %s", _ep_text(ep), e)
                except _Timeout:
                    return Unscannable(UNAVAILABLE, "timeout after %gs via %s"
                                       % (self.timeout, _ep_text(ep)))
            if not problems or _monotonic() >= deadline:
                problems.append("timeout after %gs" % self.timeout)
            return Unscannable(UNAVAILABLE, "; ".join(problems))
        finally:
            src.close()

    def _method_for(self, ep, src):
        m = self.method
        if m == "auto":
            m = "fildes" if ep[0] == "unix" else "stream"
        if m == "fildes" and ep[0] != "unix":
            m = "stream"            # no descriptor travels over TCP
        if m == "path" and src.path is None:
            m = "stream"
        if m == "fildes" and src.fd is None and src.path is None:
            m = "stream"
        return m

    def _scan_at(self, ep, src, deadline):
        """Scan over one endpoint: a Verdict, or _Failover / _Timeout."""
        import socket
        import stat
        method = self._method_for(ep, src)
        try:
            if src.fd is not None and not stat.S_ISREG(os.fstat(src.fd).st_mode):
                src.consumed = True     # a pipe or socket: one attempt only
        except OSError:
            pass
        with _session_class()(ep, self.connect_timeout, deadline) as s:
            s._init_socket()
            try:
                if method == "fildes":
                    try:
                        fd = src.readonly_fd()
                    except OSError as e:
                        return Unscannable(UNAVAILABLE, "cannot open: %s" % (e.strerror or e))
                    s.send(b"zFILDES\0")
                    s._arm()
                    socket.send_fds(s.clamd_socket, [b"\0"], [fd])
                    lines = s.read_reply()
                elif method == "path":
                    s._send_command("SCAN " + src.path)
                    lines = s.read_reply()
                else:
                    lines = self._instream(s, src)
                    if isinstance(lines, Unscannable):
                        return lines
            except socket.timeout:
                raise _Timeout()
            except OSError as e:
                if s.replied:
                    return Unscannable(UNAVAILABLE, "connection lost: %s" % (e.strerror or e))
                # Lost before any reply: clamd died or refused us; the next
                # endpoint may do better (the deadline still bounds us).
                raise _Failover("%s: %s" % (_ep_text(ep), e.strerror or e))
        if not lines:
            raise _Failover("%s: closed without a reply" % _ep_text(ep))
        return parse_reply(lines)

    def _instream(self, s, src):
        """zINSTREAM: <len><bytes>... <0>; the reply lines.  On a broken pipe
        the reply clamd sent before closing is read and used; a send failure
        with no reply is a failover (then 'unavailable'), never clean."""
        import struct
        s.send(b"zINSTREAM\0")
        try:
            fd = src.open_fd()
        except OSError as e:
            return Unscannable(UNAVAILABLE, "cannot open: %s" % (e.strerror or e))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        if fd is not None:
            import stat
            seekable = stat.S_ISREG(os.fstat(fd).st_mode)
            state = {"offset": 0}

            def read():
                if seekable:
                    n = os.preadv(fd, [view], state["offset"])
                    state["offset"] += n
                    return n
                src.consumed = True
                return os.readv(fd, [view])
        else:
            f = src.fileobj
            f.seek(0)

            def read():
                return f.readinto(view)
        try:
            while True:
                try:
                    n = read()
                except OSError as e:
                    return Unscannable(UNAVAILABLE, "cannot read: %s" % (e.strerror or e))
                if not n:
                    break
                s.send(struct.pack("!L", n))
                s.send(view[:n])
            s.send(struct.pack("!L", 0))
        except (BrokenPipeError, ConnectionResetError) as e:
            # clamd closes when StreamMaxLength is passed; its reply
            # ("INSTREAM size limit exceeded. ERROR") may still be readable.
            try:
                lines = s.read_reply()
            except (OSError, _Timeout):
                lines = []
            if lines:
                return lines
            # No reply at all: this clamd died or dropped us.  The next
            # endpoint may do better (a regular file is read again from its
            # start; a pipe cannot be, see _scan).
            raise _Failover("%s: connection lost while streaming: %s"
                            % (_ep_text(s.endpoint), e.strerror or e))
        return s.read_reply()


def _ep_text(ep):
    if ep[0] == "unix":
        return "unix:%s" % ep[1]
    host = ep[1]
    return "tcp:[%s]:%d" % (host, ep[2]) if ":" in host else "tcp:%s:%d" % (host, ep[2])


def _log():
    from scanlib.log import LOG
    return LOG
