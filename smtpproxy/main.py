"""virusgw-smtpproxy: one process per SMTP connection, the client socket on
fd 0/1 (inetd, systemd .socket Accept=yes, tcpserver).

Order of a connection: load the config (421 if it cannot be used), set up
logging (fd 2 to /dev/null), drop privileges, find the peer and the
direction, greet -- all before anything heavy is imported.  The upstream
is started at the first command that needs it (EHLO/HELO).  MAIL and RCPT
go upstream in lockstep; DATA is ours: 354, the strict reader into a spool
file, the MIME splitter, clamd (all portions in parallel), policy, then
DATA upstream with the (possibly rewritten) content, and the upstream's
reply, with our finding, back to the client.  All of that after the final
dot finishes within [smtp] deadline.

X-Virus-Scanned and X-Virus-Status (add_headers) are prepended: they are
the first lines of the delivered message, above everything the sender
wrote.  A sender can put forged X-Virus-* headers in the message, and they
are delivered below ours (clean mail goes out byte for byte, so nothing is
removed): downstream filters must read the FIRST occurrence of each.

The proxy never prints and never writes to stderr; it logs through
scanlib.log: one summary line per message and one per connection; at
[log] level = debug (or -d) also the dialogue (C> client lines, S> our
replies, P> commands to the upstream, U< its replies; escaped; never the
message content, nor AUTH's arguments; see Proxy.show_line).

What this module does not do: parse SMTP (session.py), read DATA
(datareader.py), split MIME (mime.py), rewrite (rewrite.py), decide
(scanlib.policy).
"""

import os
import select
import sys
import time

from scanlib.log import quiet_stderr, write_all
from smtpproxy import replies as R

IDENT = "virusgw-smtpproxy"
S = None                  # smtpproxy.session, imported after the greeting (Proxy)
READ = 1 << 16
EX_OK, EX_USAGE, EX_CONFIG, EX_TEMPFAIL = 0, 64, 78, 75


class ClientGone(Exception):
    pass


class ClientTimeout(Exception):
    pass


class Client:
    """The client socket on fd 0 (read) and 1 (write): buffered lines,
    replies queued and written in one write when we are about to wait."""

    def __init__(self, rfd=0, wfd=1):
        self.rfd, self.wfd = rfd, wfd
        self.buf = b""
        self.out = []
        self.tls = None             # the ssl socket once STARTTLS is done
        self.trace = None           # a logger when the dialogue is logged (debug)

    def start_tls(self, context, timeout):
        """Server-side TLS handshake on the client socket (fd 0)."""
        import socket
        sock = socket.socket(fileno=os.dup(self.rfd))
        sock.settimeout(timeout)
        self.tls = context.wrap_socket(sock, server_side=True)
        return self.tls.version()

    def queue(self, data):
        """Queue reply bytes (only replies: the client never gets anything else)."""
        if self.trace is not None:
            for line in data.split(b"\n"):
                if line:
                    self.trace.debug("S> %s", R.shown(line))
        self.out.append(data)

    def flush(self):
        if not self.out:
            return
        data = b"".join(self.out)
        self.out = []
        if self.tls is not None:
            try:
                self.tls.sendall(data)
            except OSError:
                raise ClientGone()
            return
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.wfd, view)
            except InterruptedError:
                continue
            except OSError:
                raise ClientGone()
            view = view[n:]

    def fill(self, timeout, tick=None, interval=60.0):
        """Read more into buf; tick() is called every interval seconds of
        waiting.  ClientTimeout after timeout seconds of silence."""
        self.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientTimeout()
            wait = min(left, interval) if tick else left
            if self.tls is not None:
                data = self._tls_recv(wait)
                if data is None:
                    if tick:
                        tick()
                    continue
                self.buf += data
                if tick:
                    tick()
                return data
            try:
                ready = select.select([self.rfd], [], [], wait)[0]
            except InterruptedError:
                continue
            if not ready:
                if tick:
                    tick()
                continue
            if tick:
                tick()
            try:
                data = os.read(self.rfd, READ)
            except InterruptedError:
                continue
            except OSError:
                raise ClientGone()
            if not data:
                raise ClientGone()
            self.buf += data
            return data

    def _tls_recv(self, wait):
        """Bytes from the TLS layer, None after `wait` seconds of nothing."""
        import socket
        import ssl
        self.tls.settimeout(wait)
        try:
            data = self.tls.recv(READ)
        except (socket.timeout, ssl.SSLWantReadError):
            return None
        except OSError:
            raise ClientGone()
        if not data:
            raise ClientGone()
        return data

    def line(self, timeout, limit):
        """The next line (bytes through LF), or None when it was longer
        than limit (then drained through its LF)."""
        too_long = False
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return None if too_long or len(line) > limit else line
            if len(self.buf) > limit:
                too_long = True
                self.buf = self.buf[-1:]
            self.fill(timeout)


def _nodelay(fd):
    """TCP_NODELAY on the client socket, if fd is a TCP socket.  Through
    _socket: the socket module's enum setup costs more than a greeting."""
    import _socket
    try:
        s = _socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        if s.family in (_socket.AF_INET, _socket.AF_INET6):
            s.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    except OSError:
        pass
    finally:
        s.close()


def _hostname(view):
    if view.get("hostname"):
        return view["hostname"]
    return os.uname().nodename or "localhost"


def _greeting_name(conf):
    """The hostname for the greeting and the peer if it had to be found
    first: [smtp] hostname, or the direction's override when one is written
    (then the direction is needed before the greeting)."""
    smtp = conf["smtp"]
    if any((smtp.get(d) or {}).get("hostname") for d in ("inbound", "outbound")):
        from scanlib import net
        peer = _peer()
        inside = net.Networks(conf["networks"]["inside"])
        direction = net.smtp_direction(peer[0], inside) if peer[0] else net.INBOUND
        return _hostname(conf.view("smtp", direction)), peer
    return _hostname(smtp), None


def _fallback_logfile(path):
    """[log] file of a configuration that could not be loaded, found by
    reading its lines, so that the reason for the 421 is logged where the
    administrator looks ('' = syslog)."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    except (OSError, TypeError):
        return ""
    section = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[] \t").lower()
        elif section == "log" and line.split("=", 1)[0].strip() == "file" and "=" in line:
            value = line.split("=", 1)[1].split("#", 1)[0].strip().strip("'\"")
            return value if value.startswith("/") else ""
    return ""


def _peer():
    """(address, port) of the client on fd 0 (getpeername, IPv4-mapped
    addresses normalised), else $REMOTE_ADDR or $TCPREMOTEIP."""
    from scanlib import net
    return net.peer_of_stdin()


def main(argv=None):
    rc = _main(argv)
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        # A scan still hangs in a worker thread after the deadline answered
        # for it: interpreter shutdown would join it (concurrent.futures
        # does) and keep the connection open for the scanner's timeout.
        # Our work is done and logged (scanlib.log writes unbuffered): leave now.
        os._exit(rc)
    return rc


def _main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from scanlib import config as C
    try:
        conf_path, debug = C.proxy_args(argv, IDENT)
    except ValueError:
        quiet_stderr()
        write_all(1, R.CONFIG_BROKEN.wire("virusgw"))
        return EX_USAGE
    started = time.monotonic()
    if not debug:
        quiet_stderr()
    try:
        conf = C.load(conf_path)
    except Exception as e:              # ConfigError, or anything else: never a traceback
        from scanlib import log as L
        L.setup(IDENT, _fallback_logfile(C.find_path(conf_path)), debug)
        problems = "; ".join(e.problems) if isinstance(e, C.ConfigError) else repr(e)
        L.LOG.error("configuration unusable, answering 421: %s", problems)
        write_all(1, R.CONFIG_BROKEN.wire("virusgw"))
        return EX_CONFIG
    from scanlib import privs
    try:
        privs.drop(conf.get("user", ""))
    except privs.PrivilegeError as e:
        from scanlib import log as L
        L.setup(IDENT, conf["log"]["file"], debug)
        L.LOG.error("privilege drop failed, answering 421: %s", e)
        write_all(1, R.CONFIG_BROKEN.wire("virusgw"))
        return EX_CONFIG
    _nodelay(0)
    hostname, peer = _greeting_name(conf)
    # The greeting goes out now; the peer, logging and the session are set
    # up while the client reads it.
    write_all(1, R.GREETING.wire(hostname))
    if peer is None:
        peer = _peer()
    from scanlib import log as L
    log = L.setup(IDENT, conf["log"]["file"], debug, conf["log"].get("level", "info"))
    if log.isEnabledFor(L.DEBUG):
        log.debug("S> %s", R.shown(R.GREETING.wire(hostname)))
    proxy = None
    try:
        proxy = Proxy(conf, log, peer, debug)
        return proxy.run()
    except Exception as e:              # never a traceback to the client
        log.exception("internal error: %r", e)
        if proxy is not None:
            proxy.client.out = []
        write_all(1, R.LOCAL_ERROR.wire())
        return EX_TEMPFAIL
    finally:
        if proxy is not None:
            proxy.cleanup()
            log.info(L.summary(conn="end", client=proxy.peer_text, direction=proxy.direction,
                               messages=proxy.messages, delivered=proxy.delivered,
                               blocked=proxy.blocked, tls=proxy.tls_version or "no",
                               reason=proxy.end_reason,
                               secs="%.3f" % (time.monotonic() - started)))


class Proxy:
    def __init__(self, conf, log, peer, debug=False):
        from scanlib import net
        from scanlib import log as L
        global S
        from smtpproxy import session as S
        self.conf, self.log, self.debug = conf, log, debug
        self.addr, self.port = peer
        inside = net.Networks(conf["networks"]["inside"])
        self.inside = bool(self.addr) and self.addr in inside
        self.direction = net.smtp_direction(self.addr, inside) if self.addr else net.INBOUND
        self.view = conf.view("smtp", self.direction)
        self.peer_text = "%s:%d" % (self.addr, self.port) if self.addr else "unknown"
        self.hostname = _hostname(self.view)
        self.client = Client()
        # The dialogue in the log ([log] level = debug, or -d): C> client
        # lines, S> our replies, P> what we send upstream, U< its replies.
        # Decided once: nothing is formatted above debug.
        self.trace = log if log.isEnabledFor(L.DEBUG) else None
        self.client.trace = self.trace
        self.hide_body = False      # after a DATA we did not answer 354 (see show_line)
        self.upstream = None
        self.spool = None
        self.messages = self.delivered = self.blocked = 0
        self.end_reason = "quit"
        self.tls_version = ""
        v = self.view
        self.session = S.Session(S.Settings(
            hostname=self.hostname, inside=self.inside, local_domains=v["local_domains"],
            max_size=v["max_message_size"], max_recipients=v["max_recipients"],
            max_errors=v["max_errors"], client_addr=self.addr, client_port=self.port,
            tls=bool(v.get("tls_cert") and v.get("tls_key"))))

    # -- the dialogue ----------------------------------------------------------
    def run(self):
        c, sess = self.client, self.session
        timeout = self.view["timeout"]
        try:
            while True:
                line = c.line(timeout, S.MAX_LINE)
                if self.trace is not None:
                    self.show_line(line)
                action = sess.too_long() if line is None else sess.line(line)
                if self.trace is not None and line is not None and not self.hide_body \
                        and line[:4].upper() == b"DATA" and isinstance(action, S.Send):
                    # Refused: a pipelining client sends the content anyway, and
                    # it arrives here as "commands".  Never logged.
                    self.hide_body = True
                if not self.execute(action):
                    break
        except ClientTimeout:
            self.end_reason = "timeout"
            c.queue(R.TIMEOUT.wire(self.hostname))
        except ClientGone:
            self.end_reason = "client-gone"
        try:
            c.flush()
        except ClientGone:
            pass
        return EX_OK

    def show_line(self, line):
        """Log one client line (C>): AUTH as its verb only (credentials may
        follow it on the line).  After a refused DATA, up to a line ".",
        the lines are the message content a pipelining client sent anyway:
        neither they nor what they cause (S>, P>, U<: replies and relayed
        commands can echo them) are logged, only their sizes."""
        if self.hide_body:
            self.client.trace = None
            if self.upstream is not None:
                self.upstream.trace = None
            if line is not None and line.rstrip(b"\r\n") == b".":
                self.hide_body = False
            self.trace.debug("C> (%d bytes after a refused DATA, not shown, nor the replies)",
                             len(line) if line is not None else S.MAX_LINE)
            return
        self.client.trace = self.trace
        if self.upstream is not None:
            self.upstream.trace = self.trace
        if line is None:
            self.trace.debug("C> (line over %d bytes, not shown)", S.MAX_LINE)
        elif line[:4].upper() == b"AUTH" and line[4:5] in (b" ", b"\r", b"\n", b""):
            self.trace.debug("C> AUTH (arguments not shown)")
        else:
            self.trace.debug("C> %s", R.shown(line))

    def execute(self, action):
        """Carry out one action; False when the connection ends."""
        c = self.client
        while isinstance(action, S.Relay):
            up = self.ensure_upstream()
            if up is None:
                return False
            from smtpproxy.upstream import UpstreamError
            try:
                code, lines = up.command(action.command)
            except UpstreamError as e:
                self.log.warning("upstream failed at %s: %s", action.kind, e)
                c.queue(R.UPSTREAM_LOST.wire(self.hostname))
                self.end_reason = "upstream-lost"
                return False
            action = self.session.upstream(action.kind, code, lines)
        if isinstance(action, S.StartData):
            return self.data()
        if isinstance(action, S.StartTLS):
            return self.start_tls()
        c.queue(action.data)
        if action.close:
            if action.data.startswith(b"221"):
                self.end_reason = "quit"
            else:
                self.end_reason = "errors"
            return False
        return True

    def start_tls(self):
        """RFC 3207: 220, handshake, forget the session.  Plaintext the
        client pipelined behind STARTTLS is discarded, never read as if it
        had come through TLS (CVE-2011-0411 class)."""
        c = self.client
        try:
            import ssl
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(self.view["tls_cert"], self.view["tls_key"])
        except (OSError, ValueError) as e:          # ssl.SSLError is an OSError
            self.log.error("STARTTLS: cannot load %s / %s: %s",
                           self.view["tls_cert"], self.view["tls_key"], e)
            c.queue(R.TLS_UNAVAILABLE.wire())
            return True
        if c.buf:
            self.log.warning("STARTTLS: discarded %d bytes of plaintext pipelined after it",
                             len(c.buf))
            c.buf = b""
        c.queue(R.TLS_READY.wire())
        c.flush()
        try:
            self.tls_version = c.start_tls(ctx, self.view["timeout"])
        except OSError as e:
            self.log.warning("STARTTLS handshake failed: %s", e)
            self.end_reason = "tls-failed"
            c.out = []
            return False
        self.session.tls_started()
        return True

    def ensure_upstream(self):
        if self.upstream is not None and self.upstream.alive:
            return self.upstream
        if self.upstream is not None:           # it died earlier: nothing more to do
            self.client.queue(R.UPSTREAM_LOST.wire(self.hostname))
            self.end_reason = "upstream-lost"
            return None
        from smtpproxy.upstream import Upstream, UpstreamError
        self.upstream = Upstream(self.view["upstream"], self.addr, self.port,
                                 timeout=self.view["timeout"])
        self.upstream.trace = None if self.hide_body else self.trace
        try:
            self.upstream.start()
        except UpstreamError as e:
            self.log.warning("upstream unavailable: %s", e)
            self.client.queue(R.UNAVAILABLE.wire(self.hostname))
            self.end_reason = "upstream-unavailable"
            return None
        return self.upstream

    def keepalive(self):
        if self.upstream is not None:
            from smtpproxy.upstream import UpstreamError
            try:
                self.upstream.keepalive(self.view["keepalive"])
            except UpstreamError as e:
                self.log.warning("upstream lost during keep-alive: %s", e)

    # -- DATA --------------------------------------------------------------------
    def data(self):
        from scanlib.spool import Spool
        from smtpproxy.datareader import DataReader
        c, sess = self.client, self.session
        if self.spool is None:
            # Spool files exist from here on: SIGTERM/SIGHUP must run the cleanup.
            from scanlib.spool import install_signal_cleanup
            install_signal_cleanup()
            self.spool = Spool(self.conf["spool"]["directory"])
        try:
            body = self.spool.create(prefix="vgw-msg-")
        except OSError as e:
            self.log.error("cannot create a spool file in %s: %s",
                           self.conf["spool"]["directory"], e)
            c.queue(R.LOCAL_ERROR.wire())
            self.hide_body = self.trace is not None
            return self.abort_transaction()
        c.queue(R.START_DATA.wire())
        reader = DataReader(body, max_size=sess.size_limit,
                            max_line=self.view["max_line_length"])
        pending, c.buf = c.buf, b""
        done = reader.feed(pending) if pending else False
        while not done:
            data = c.fill(self.view["timeout"], tick=self.keepalive,
                          interval=self.view["keepalive"])
            c.buf = b""
            done = reader.feed(data)
        c.buf = reader.rest
        self.messages += 1
        try:
            reply, outcome = self.message(body, reader)
        finally:
            self.spool.cleanup()
        c.queue(reply)
        if outcome == "delivered":
            self.delivered += 1
        elif outcome != "lost":
            self.blocked += 1
        sess.end_transaction()
        return outcome != "lost"

    def abort_transaction(self):
        """Reset the upstream's open transaction after a local refusal."""
        self.session.end_transaction()
        if self.upstream is not None and self.upstream.alive:
            from smtpproxy.upstream import UpstreamError
            try:
                self.upstream.command(b"RSET\r\n")
            except UpstreamError as e:
                self.log.warning("upstream RSET failed: %s", e)
        return True

    def message(self, body, reader):
        """Scan, decide, deliver: (reply bytes, outcome)."""
        from smtpproxy.message import Message
        m = Message(self, body, reader)
        return m.process()

    def cleanup(self):
        if self.upstream is not None:
            self.upstream.quit()
        if self.spool is not None:
            self.spool.cleanup()
