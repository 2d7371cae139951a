"""virusgw-ftpproxy [-c FILE] [-d]: one FTP control connection on stdin/stdout.

Started per connection by inetd or a systemd .socket (Accept=yes).  The
proxy greets with its own 220, picks the server (ftpproxy.upstream), and
relays the dialogue through the command table of ftpproxy.session.  Data
connections on both legs are its own (ftpproxy.data).

Transfers (store and forward; the server always speaks TYPE I to us, and
what is scanned is exactly what the server stores or serves):
  RETR  fetched whole from the server into a spool file, scanned, then
        150, the data and 226.  What is served is exactly what was judged:
        with TYPE A or a REST offset the served form (from the offset, LF
        -> CRLF) is written to a second spool file and scanned as its own
        item along with the whole; the strongest verdict wins, and that
        second file is what is sent.  (A hash signature can know a suffix
        or a CRLF form that the stored whole does not match.)  Refused
        files get 550 as the first reply, with the scanner's finding in
        continuation lines.  With `progress = yes` a
        long fetch or scan sends '150-' keep-alive lines; the reply then
        ends with '150 ...' and a refused file gets 451 with no data.
  REST  remembered by the proxy (350).  REST + RETR fetches the whole file
        from offset 0, scans the whole and the part served, and serves it
        from the offset (the offset counts bytes as stored, also in TYPE A;
        past the end: 554).
        REST before STOR or APPE is refused (550): a resumed upload would
        store fragments the proxy never saw together.
  STOR  150, received to a spool file (TYPE A: CRLF -> LF), scanned, then
        uploaded; the client hears 226 only after the server's 226, or 451
        (temporary), 551 (infected) or 552/551 (unscannable) with the
        finding.  An upload ended by a reset, a timeout or ABOR is never
        forwarded (426).  An upload ended by an orderly close is complete
        as far as stream mode can tell, and is scanned and stored.
  APPE  the existing server file is fetched first; existing + appended
        bytes are scanned as one file, and that scanned whole is stored
        with STOR (never APPE: the server would append to whatever it
        holds by then, and another session may have replaced the file
        between the fetch and the append, assembling bytes nobody scanned).
        The server stores exactly what was scanned.  Costs: the whole file
        crosses twice; a concurrent writer's change between the fetch and
        the STOR is overwritten (last writer wins, as with STOR); a server
        that grants append but not overwrite refuses it (its reply is
        relayed).  If the existing file cannot be fetched the APPE is
        refused (550), since the whole could not be scanned.
  Size  a transfer is never spooled past [scanner] max_size: an upload
        (APPE: existing + new) that grows beyond it is cut off (the data
        connection closed unread, so the client's send fails) and refused
        with 552; a download whose fetch grows beyond it is aborted on the
        server and refused with 550 (451 after '150-' keep-alives).  This
        holds whatever on_unscannable says: the proxy never has the whole
        file, so it can neither scan it, nor quarantine it, nor pass it
        (relaying it unscanned as a stream would be a second transfer path
        that is never scanned).  Items clamd itself finds too big (its
        StreamMaxLength below max_size) follow on_unscannable as usual.
  STOU  refused (502): the server would choose the name only after the
        scan, too late for the '150 FILE:' reply; a client that wants a
        unique name can pick one and use STOR.
  LIST, NLST, MLSD  relayed unscanned.
  RNTO  refused (553) when the accepted RNFR named a file whose extension
        is in skip_extensions (of either direction) and the new name's is
        not: such a file may have been stored unscanned, and renaming it
        would put unscanned content under a name the rule always scans.
        (A directory named like a skipped file is caught by this too.)
  ABOR  in band, as TCP urgent data (SO_OOBINLINE is set on the control
        socket so the bytes stay in the stream) or behind Telnet IAC IP/DM
        (stripped by the line reader): stops both legs and the scan; the
        client hears 426 for the transfer, then 226 for the ABOR.

Quarantine: action = quarantine stores every refused file and names the
entry.  keep_blocked copies (delete/reject, named to nobody) are kept once
per content: the same sha256 kept in the last hour (KEEP_BLOCKED_DEDUP) is
not stored again, so repeating a refused RETR cannot fill the store.

Logging: one summary line per transfer (id, client, user, server,
direction, command, path, size, verdict, viruses, action, qid, reply and
secs=PHASE:SECONDS for fetch/receive, scan, send/upload) and one per session
(scanlib.log.summary); PASS is never logged.  Nothing is ever written to
stdout or stderr except protocol replies on the control connection.
"""

import os
import sys
import time

# The C module, not the socket package: importing that (enum, selectors)
# costs ~5 ms before the greeting.  Data connections (ftpproxy.data) use the
# full package after it.
import _socket

from ftpproxy import session as S
from scanlib.log import quiet_stderr
from ftpproxy.replies import reply

IDENT = "virusgw-ftpproxy"
LISTINGS = ("LIST", "NLST", "MLSD")
MAX_QUEUED = 64          # commands read ahead while a transfer runs
KEEP_BLOCKED_DEDUP = 3600    # seconds: a blocked copy of the same bytes is kept once


class ClientGone(Exception):
    pass


class Stop(Exception):
    """End the session after the reply already sent."""


class Control:
    """The client's control connection: fd 0 (a socket under inetd), or
    fd 0/1 pipes when run by hand."""

    def __init__(self):
        self.sock = None
        try:
            fd = os.dup(0)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                s = _socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
            else:
                try:
                    s.getpeername()
                    self.sock = s
                except OSError:
                    s.close()
        if self.sock is not None:
            for level, opt in ((_socket.IPPROTO_TCP, _socket.TCP_NODELAY),
                               (_socket.SOL_SOCKET, _socket.SO_OOBINLINE)):
                try:
                    self.sock.setsockopt(level, opt, 1)
                except OSError:
                    pass
        self.reader = S.LineReader()
        self.events = []
        self.eof = False

    def fileno(self):
        return self.sock.fileno() if self.sock is not None else 0

    def send(self, data):
        try:
            if self.sock is not None:
                self.sock.sendall(data)
            else:
                view = memoryview(data)
                while view:
                    n = os.write(1, view)
                    view = view[n:]
        except OSError:
            raise ClientGone()

    def fill(self, timeout):
        """Read once if something arrives within timeout.  True if read."""
        import select
        if self.eof:
            return False
        r, _, _ = select.select([self.fileno()], [], [], timeout)
        if not r:
            return False
        try:
            data = self.sock.recv(8192) if self.sock is not None else os.read(0, 8192)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return True
        self.events.extend(self.reader.feed(data))
        return True

    def next(self, timeout):
        """The next event, ('eof', None), or None on timeout."""
        deadline = time.monotonic() + timeout
        while not self.events:
            if self.eof:
                return ("eof", None)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.fill(left)
        return self.events.pop(0)

    def take_abort(self):
        """Poll without blocking; True (and the ABOR line consumed) if the
        client sent ABOR.  Other commands stay queued, in order."""
        # bounded: a client flooding the control connection during a
        # transfer is left in the kernel's buffer, not in our memory
        while len(self.events) < MAX_QUEUED and self.fill(0):
            if self.eof:
                break
        for i, (kind, line) in enumerate(self.events):
            if kind == "line" and line.strip().upper() == b"ABOR":
                del self.events[i]
                return True
        return False


class Progress:
    """'150-' keep-alives for a long RETR and NOOPs to an idle server."""

    def __init__(self, proxy, enabled, interval, name):
        self.proxy = proxy
        self.enabled = enabled
        self.interval = interval
        self.name = name
        self.started = False
        self.last_client = time.monotonic()
        self.last_server = time.monotonic()
        self.server_idle = False       # True while the server's control is idle
        self.phase = "fetching"
        self.ended = False

    def end(self, text, always=False):
        """End the keep-alive reply with its '150 text' line (a multi-line
        reply ends with the code it started with); with always, send that
        150 line even when no keep-alive went out."""
        if self.ended or not (self.started or always):
            return
        self.ended = True
        self.proxy.r(150, text)

    def tick(self):
        now = time.monotonic()
        if self.enabled and not self.ended and now - self.last_client >= self.interval:
            self.last_client = now
            self.started = True
            self.proxy.ctl.send(("150-%s %s, please wait\r\n"
                                 % (self.phase.capitalize(), self.proxy.safe(self.name)))
                                .encode("utf-8", "replace"))
        if self.server_idle and now - self.last_server >= self.interval:
            self.last_server = now
            up = self.proxy.up
            if up is not None:
                r = up.command(b"NOOP", timeout=30)
                if r.code >= 400:
                    self.proxy.log.debug("server answered NOOP with %d", r.code)


class Proxy:
    def __init__(self, conf, ctl, log, debug=False):
        from scanlib import net
        self.conf = conf
        self.ctl = ctl
        self.log = log
        self.debug = debug
        self.ftp = conf.view("ftp")
        self.inside = net.Networks(conf["networks"]["inside"])
        self.client, self.client_port = net.peer_of_stdin()
        self.local = None
        self.family = _socket.AF_INET
        if ctl.sock is not None:
            self.local = ctl.sock.getsockname()[0]
            self.family = ctl.sock.family
        up = self.ftp["upstream"]
        self.mode = "userhost" if up == "userhost" else up.split(":", 1)[0]
        self.session = S.Session(self.mode, self.client, self.ftp.get("site_allow", ()))
        self.up = None
        self.listener = None
        self.active = None
        self.server_name = ""
        self.spool = None
        self.scanner = None
        self.sid = "%x%05x" % (int(time.time()), os.getpid() & 0xFFFFF)
        self.ntransfers = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.started = time.monotonic()
        self.result = "ok"

    # -- helpers -------------------------------------------------------------
    @staticmethod
    def safe(name):
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return "".join(c if c.isprintable() else "?" for c in name)[:200]

    def send(self, data):
        self.ctl.send(data)

    def r(self, code, *lines):
        self.ctl.send(reply(code, *lines))

    # -- main loop -----------------------------------------------------------
    def run(self):
        from ftpproxy.upstream import UpstreamError
        try:
            while True:
                ev = self.ctl.next(self.ftp["timeout"])
                if ev is None:
                    self.r(421, "Timeout: closing control connection")
                    self.result = "idle-timeout"
                    return
                kind, line = ev
                if kind == "eof":
                    self.result = "client-closed"
                    return
                if kind == "too-long":
                    self.r(500, "Command line too long")
                    continue
                if self.debug:
                    shown = line if not line[:4].upper().startswith(b"PASS") else b"PASS ****"
                    self.log.debug("C> %r", shown)
                action = self.session.handle(line)
                self.execute(action)
        except Stop:
            return
        except UpstreamError as e:
            from scanlib.log import escape
            self.log.warning("upstream: %s", escape(str(e)))     # server text: never raw
            self.result = "upstream-error"
            try:
                self.r(421, "Service not available: %s" % self.safe(str(e)))
            except ClientGone:
                pass
        except ClientGone:
            self.result = "client-gone"

    def execute(self, a):
        if isinstance(a, S.Reply):
            self.send(a.data)
            if a.close:
                self.result = "quit"
                raise Stop()
            return
        if isinstance(a, S.Relay):
            return self.relay(a)
        if isinstance(a, S.Login):
            return self.login(a)
        if isinstance(a, S.Passive):
            return self.passive(a.extended)
        if isinstance(a, S.Active):
            self.close_listener()
            self.session.active_set(a.address, a.port)
            return self.r(200, "%s command successful" % a.verb)
        if isinstance(a, S.Feat):
            return self.feat()
        if isinstance(a, S.Abort):
            return self.r(225, "No transfer to abort")
        if isinstance(a, S.Transfer):
            try:
                return self.transfer(a)
            finally:
                self.close_listener()
                self.session.transfer_done()
        self.r(502, "Command not implemented")

    # -- control-only commands -------------------------------------------------
    def relay(self, a):
        if self.up is None:
            return self.r(530, "Please login with USER and PASS")
        if a.verb == "RNTO":
            source, self.rnfr = self.rnfr, None
            refusal = self.rename_refusal(source, a.line.partition(b" ")[2])
            if refusal:
                return self.r(553, refusal)
        self.rnfr = None
        self.up.send(a.line)
        while True:
            r = self.up.reply()
            self.send(r.raw())
            if r.code >= 200:
                break
        if a.verb == "RNFR" and r.code == 350:
            self.rnfr = a.line.partition(b" ")[2]
        was = self.session.state
        self.session.upstream_reply(a.verb, r.code)
        if was != S.READY and self.session.state == S.READY:
            # The server speaks TYPE I with us from the start: SIZE, REST
            # and the bytes scanned are then the stored bytes.
            # A refusal here is retried at the first transfer (where it is
            # fatal); a lost server shows at the next command.
            from ftpproxy.upstream import UpstreamError
            try:
                self.up.ensure_binary()
            except UpstreamError as e:
                from scanlib.log import escape
                self.log.debug("TYPE I after login: %s", escape(str(e)))

    rnfr = None          # the name of an accepted RNFR, until the next command

    def rename_refusal(self, source, target):
        """Why RNFR source / RNTO target is refused, or None.  A file whose
        name skip_extensions skips may have passed unscanned; it must not
        get a name that the rule says is always scanned (in either
        direction's view)."""
        if source is None:
            return None
        from scanlib import filetype
        for upload in (True, False):
            skip = self.conf.view("ftp", self.direction(upload)).get("skip_extensions") or []
            if (filetype.extension_skips(source, skip)
                    and not filetype.extension_skips(target, skip)):
                return ("Rename refused: %s may have passed unscanned (skip_extensions) "
                        "and cannot take a name that is scanned" % self.safe(source))
        return None

    def login(self, a):
        from ftpproxy.upstream import Upstream, UpstreamError, Denied, resolve
        if self.up is None or not self.up_greeted:
            try:
                if self.mode == "userhost":
                    if a.host is None:
                        return self.r(530, "Login as USER name@host[:port]")
                    family, sockaddr = resolve(a.host, a.port, self.ftp["allowed_upstreams"],
                                               self.client, self.inside)
                    self.up = Upstream.connect(family, sockaddr, self.ftp["timeout"])
                    self.server_name = "%s:%d" % (a.host, a.port)
                    self.session.target = (a.host, a.port)
                elif self.mode == "tcp":
                    from scanlib.config import split_hostport
                    host, port = split_hostport(self.ftp["upstream"][4:], 21)
                    self.up = Upstream.connect_name(host, port, self.ftp["timeout"])
                    self.server_name = "%s:%d" % (host, port)
                self.up.greeting()
                self.up_greeted = True
            except Denied as e:
                self.log.warning(self.summary_session_fields(event="denied", reason=str(e)))
                self.up = None
                return self.r(530, "Server not allowed: %s" % e)
            except UpstreamError as e:
                from scanlib.log import escape
                self.log.warning("upstream: %s", escape(str(e)))
                self.result = "upstream-unreachable"
                self.r(421, "Cannot reach the FTP server: %s" % self.safe(str(e)))
                raise Stop()
        self.session.user = a.user
        self.relay(S.Relay("USER", a.line))

    up_greeted = False

    def summary_session_fields(self, **extra):
        from scanlib.log import summary
        fields = dict(id=self.sid, client=self.client, user=self.session.user,
                      server=self.server_name)
        fields.update(extra)
        return summary(**fields)

    def feat(self):
        lines = list(S.OWN_FEATS)
        if self.up is not None and self.up_greeted:
            r = self.up.command(b"FEAT")
            if r.code == 211:
                for raw in r.lines[1:-1]:
                    text = raw.decode("utf-8", "replace").strip()
                    name = text.split(" ", 1)[0].upper()
                    if name in S.RELAYED_FEATS and text not in lines:
                        lines.append(text)
        else:
            lines.append("UTF8")
        out = "211-Features:\r\n" + "".join(" %s\r\n" % l for l in lines) + "211 End\r\n"
        self.send(out.encode("utf-8", "replace"))

    # -- data connections on the client's side ----------------------------------
    def close_listener(self):
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def passive(self, extended):
        from ftpproxy import addr as A
        from ftpproxy.data import PassiveListener, DataError
        from scanlib import net
        self.close_listener()
        if self.local is None:
            return self.r(425, "No passive mode without a socket")
        if not extended:
            shown = self.ftp.get("passive_address") or self.local
            try:
                if net.normalise(shown).version != 4:
                    return self.r(425, "PASV is IPv4 only: use EPSV")
            except ValueError:
                return self.r(425, "Bad passive_address")
        try:
            self.listener = PassiveListener(self.local, self.family, self.ftp["passive_ports"],
                                            self.client or None)
        except DataError as e:
            self.log.warning("passive: %s", e)
            return self.r(425, "Cannot open a passive connection")
        self.session.passive_opened()
        if extended:
            return self.r(229, A.format_epsv(self.listener.port))
        return self.r(227, A.format_pasv(shown, self.listener.port))

    def client_data(self, tick):
        from ftpproxy.data import connect_active
        timeout = self.ftp["data_timeout"]
        if self.session.data == "passive":
            return self.listener.accept(timeout, tick)
        _, address, port = self.session.data
        return connect_active(self.family, self.local or "", address, port, timeout)

    def make_tick(self, progress=None):
        from ftpproxy.data import Aborted

        def tick():
            if self.ctl.take_abort():
                raise Aborted()
            if self.ctl.eof:
                raise ClientGone()
            if progress is not None:
                progress.tick()
        return tick

    def abort_reply(self):
        self.r(426, "Connection closed; transfer aborted")
        self.r(226, "ABOR command successful")

    def abort_upstream(self):
        """Tell the server to stop its transfer and swallow its replies.
        Servers answer ABOR with 426+226, or 226 (the transfer had ended)
        then 225/226: a NOOP after it marks where the replies end, so the
        control connection is back in step whichever way it went."""
        self.up.send(b"ABOR", check=False)
        self.up.send(b"NOOP", check=False)
        deadline = time.monotonic() + 15
        while True:
            r = self.up.reply(timeout=max(0.1, deadline - time.monotonic()))
            if r.code == 200:
                return

    # -- transfers -----------------------------------------------------------------
    def transfer(self, t):
        if self.up is None:
            return self.r(530, "Please login with USER and PASS")
        if self.spool is None:
            from scanlib.spool import Spool
            self.spool = Spool(self.conf["spool"]["directory"])
        self.up.ensure_binary()
        if t.verb in LISTINGS:
            return self.listing(t)
        if t.verb == "RETR":
            return self.retr(t)
        return self.stor(t)

    def listing(self, t):
        from ftpproxy.data import DataError, Aborted, pump, finish
        dsock, err = self.up.open_data()
        if err is not None:
            return self.send(err.raw())
        line = t.verb.encode() + (b" " + t.arg if t.arg else b"")
        r = self.up.transfer_command(line)
        if not 100 <= r.code < 200:
            dsock.close()
            return self.send(r.raw())
        self.send(r.raw())
        tick = self.make_tick()
        conn = None
        try:
            conn = self.client_data(tick)
            n = pump(dsock, conn, self.ftp["data_timeout"], tick)
            self.bytes_down += n
        except Aborted:
            dsock.close()
            if conn:
                conn.close()
            self.abort_upstream()
            return self.abort_reply()
        except DataError as e:
            dsock.close()
            if conn:
                conn.close()
            self.up.final_reply()
            return self.r(425 if conn is None else 426, "Data connection failed: %s" % e)
        finish(conn)
        dsock.close()
        self.send(self.up.final_reply().raw())

    def fetch(self, path, f, progress, tick, limit=None):
        """RETR path from the server into f.  Returns (size, None) or
        (None, reply bytes for the client).  TooBig (the server's transfer
        aborted, the control connection back in step) past limit bytes."""
        from ftpproxy.data import DataError, TooBig, recv_to_file
        dsock, err = self.up.open_data()
        if err is not None:
            return None, err.raw()
        r = self.up.transfer_command(b"RETR " + path)
        if not 100 <= r.code < 200:
            dsock.close()
            return None, r.raw()
        try:
            size = recv_to_file(dsock, f, self.ftp["data_timeout"], tick, limit=limit)
        except TooBig:
            dsock.close()
            self.abort_upstream()
            raise
        except DataError as e:
            dsock.close()
            self.up.final_reply()
            return None, reply(451, "Fetching the file from the server failed: %s" % e)
        finally:
            dsock.close()
        final = self.up.final_reply()
        if final.code != 226 and final.code != 250:
            return None, final.raw()
        return size, None

    def scan(self, f, name, progress, tick, extra=()):
        """Verdict for the spooled file (the strongest of it and the extra
        files: the bytes actually served), or None when skip_extensions lets
        it pass unscanned.  Waits in slices so that ABOR is seen."""
        from scanlib import filetype
        view = self.view
        skip = view.get("skip_extensions") or []
        f.flush()
        if skip and filetype.may_skip_file(name, f, skip):
            return None          # the whole file (APPE: old + new) is plain text
        if self.scanner is None:
            from scanlib.scanner import Scanner
            self.scanner = Scanner.from_config(self.conf["scanner"])
        import threading
        from scanlib.verdict import strongest
        result = []
        items = [f] + list(extra)
        for x in items:
            x.flush()
            x.seek(0)
        th = threading.Thread(
            target=lambda: result.append(strongest(self.scanner.scan_many(items))),
            daemon=True)
        th.start()
        if progress is not None:
            progress.phase = "scanning"
            progress.server_idle = True
        limit = time.monotonic() + self.scanner.timeout + 30
        while th.is_alive() and time.monotonic() < limit:
            th.join(0.2)
            tick()
        if progress is not None:
            progress.server_idle = False
        if not result:
            from scanlib.verdict import Unscannable, UNAVAILABLE
            return Unscannable(UNAVAILABLE, "scan did not finish")
        return result[0]

    def decide(self, verdict, upload):
        from scanlib import policy
        from scanlib.verdict import Clean
        return policy.ftp(verdict if verdict is not None else Clean(), self.view,
                          self.conf["scanner"], upload)

    def notes(self, name, verdict, decision, qid):
        from scanlib.scanner import verdict_line
        from scanlib.verdict import Infected
        base = self.safe(name.rsplit(b"/", 1)[-1] if isinstance(name, bytes) else name)
        if verdict is None:
            out = ["%s: not scanned (skip_extensions)" % base]
        else:
            out = ["virusgw: " + verdict_line(base, verdict, detail=True)]
            if isinstance(verdict, Infected) and decision.action == "pass":
                out.append("Infected file passed by policy (action = pass)")
        if qid:
            out.append("Quarantined as %s" % qid)
        return out

    def quarantine(self, f, meta, dedup=False):
        """Store f; with dedup (a keep_blocked copy, named to nobody) skip it
        when the same bytes were kept in the last KEEP_BLOCKED_DEDUP seconds:
        a client repeating a refused RETR cannot fill the store."""
        from scanlib.quarantine import Store
        store = Store.from_config(self.conf["quarantine"])
        if dedup:
            import hashlib
            h = hashlib.sha256()
            pos = 0
            while True:
                block = os.pread(f.fileno(), 1 << 20, pos)
                if not block:
                    break
                h.update(block)
                pos += len(block)
            old = store.recent_copy(h.hexdigest(), KEEP_BLOCKED_DEDUP)
            if old is not None:
                self.log.debug("blocked copy not kept again: same bytes as %s", old)
                return None
        f.seek(0)
        return store.add(f, meta)

    def meta(self, verb, path, direction, verdict, decision):
        from scanlib.verdict import Infected
        rule = ("ftp.%s.action=%s" % (direction or "base", self.view["action"])
                if decision.cause == "infected" else
                "scanner.on_%s=%s" % ("unavailable" if decision.cause == "unavailable"
                                      else "unscannable",
                                      self.conf["scanner"]["on_" + ("unavailable"
                                                                    if decision.cause ==
                                                                    "unavailable" else
                                                                    "unscannable")]))
        try:
            version = self.scanner.version() if self.scanner else ""
        except Exception:
            version = ""
        p = path.decode("utf-8", "replace")
        return dict(protocol="ftp", direction=direction or "", client=self.client,
                    ftp_user=self.session.user, ftp_server=self.server_name, ftp_path=p,
                    filename=p.rsplit("/", 1)[-1], command=verb,
                    viruses=list(verdict.names) if isinstance(verdict, Infected) else [],
                    action=decision.action,
                    reason=("infected" if decision.cause == "infected" else "unscannable"),
                    rule=rule, scanner_version=version)

    def settle(self, f, verb, path, direction, verdict, decision):
        """Quarantine or keep a blocked copy.  Returns (qid, error text)."""
        from scanlib.quarantine import QuarantineError
        blocked = decision.action in ("delete", "reject")
        if decision.action != "quarantine" and not (blocked and
                                                    self.conf["quarantine"]["keep_blocked"]
                                                    and decision.cause != "unavailable"):
            return None, None
        meta = self.meta(verb, path, direction, verdict, decision)
        try:
            qid = self.quarantine(f, meta, dedup=decision.action != "quarantine")
        except (QuarantineError, OSError) as e:
            self.log.warning("quarantine: %s", e)
            if decision.action == "quarantine":
                return None, str(e)
            return None, None
        return (qid if decision.action == "quarantine" else None), None

    def log_transfer(self, verb, path, direction, size, verdict, decision, qid, code):
        from scanlib.log import summary
        from scanlib.verdict import Infected
        self.ntransfers += 1
        v = "skipped" if verdict is None else verdict.kind
        self.log.info(summary(
            id="%s.%d" % (self.sid, self.ntransfers), client=self.client,
            user=self.session.user, server=self.server_name, direction=direction or "base",
            command=verb, path=path, size=size, verdict=v,
            viruses=list(verdict.names) if isinstance(verdict, Infected) else None,
            reason=getattr(verdict, "reason", None),
            action=decision.action if decision else None, qid=qid, reply=code,
            secs=",".join("%s:%.3f" % p for p in self.phases) or None))
        self.phases = []

    phases = ()

    def phase(self, name):
        """Record how long the phase that ends now took (for the summary)."""
        now = time.monotonic()
        if not self.phases:
            self.phases = []
        self.phases.append((name, now - self.phase_start))
        self.phase_start = now

    phase_start = 0.0

    def direction(self, upload):
        from scanlib import net
        server = str(self.up.peer[0])
        if upload:
            return net.ftp_direction(self.client, server, self.inside)
        return net.ftp_direction(server, self.client, self.inside)

    def retr(self, t):
        from ftpproxy.upstream import UpstreamError
        progress = None
        try:
            direction = self.direction(upload=False)
            self.view = self.conf.view("ftp", direction)
            progress = Progress(self, self.view["progress"], self.view["progress_interval"],
                                t.arg)
            return self._retr(t, direction, progress)
        except ClientGone:
            raise
        except (UpstreamError, Exception):
            # After '150-' keep-alives the reply must end with its '150 '
            # line before the 421 that ends the session.
            if progress is not None:
                progress.end("Transfer failed")
            raise

    def _retr(self, t, direction, progress):
        from ftpproxy.data import DataError, Aborted, TooBig, send_file, finish, copy_served
        tick = self.make_tick(progress)
        try:
            f, fpath = self.spool_file()
        except OSError as e:
            self.log.error("spool: %s", e)
            return self.r(451, "Local error: no spool space, try again later")
        served = spath = None
        verdict = decision = qid = None
        code = None
        size = 0
        self.phases, self.phase_start = [], time.monotonic()
        try:
            try:
                try:
                    size, err = self.fetch(t.arg, f, progress, tick,
                                           limit=self.conf["scanner"]["max_size"])
                except TooBig as e:
                    verdict, decision = self.too_big(e, upload=False)
                    code = 451 if progress.started else decision.code
                    progress.end("Fetch stopped")
                    return self.r(code, *(self.notes(t.arg, verdict, decision, None)
                                          + ["Download refused: larger than [scanner] "
                                             "max_size, cannot be scanned"]))
                self.phase("fetch")
                if err is not None:
                    code = int(err[:3])
                    if progress.started:
                        progress.end("Fetch failed")
                        err = reply(451, "Fetching the file from the server failed")
                        code = 451
                    return self.send(err)
                # What is served must be what was judged: with a REST offset
                # or ASCII conversion the served bytes are another item
                # (a hash signature knows a suffix, or a CRLF form, that the
                # stored whole does not match), scanned with the whole.
                ascii = self.session.type == "A"
                extra = []
                if (t.rest or ascii) and t.rest <= size:
                    served, spath = self.spool_file()
                    copy_served(f, served, t.rest, ascii)
                    extra.append(served)
                verdict = self.scan(f, t.arg, progress, tick, extra)
                self.phase("scan")
            except Aborted:
                code = 426
                # the server leg may still be open: tell it (a server that
                # does not answer ends the session with 421)
                self.abort_upstream()
                progress.end("Aborted")
                return self.abort_reply()
            decision = self.decide(verdict, upload=False)
            qid, qerr = self.settle(f, "RETR", t.arg, direction, verdict, decision)
            notes = self.notes(t.arg, verdict, decision, qid)
            if qerr is not None:
                code = 451
                progress.end("Scan finished")
                return self.r(451, *(notes + ["Quarantine unavailable, try again later"]))
            if decision.action != "pass":
                code = 451 if progress.started else decision.code
                progress.end("Scan finished")
                final = {"tempfail": "Virus scanner unavailable, try again later"}.get(
                    decision.action, "Download refused: %s" % decision.cause)
                return self.r(code, *(notes + [final]))
            if t.rest > size:
                code = 451 if progress.started else 554
                progress.end("Scan finished")
                return self.r(code, "Restart offset %d is past the end of the file" % t.rest)
            out = served if served is not None else f
            nbytes = os.fstat(out.fileno()).st_size
            progress.end("Opening %s mode data connection for %s (%d bytes)"
                         % ("ASCII" if ascii else "BINARY", self.safe(t.arg), nbytes),
                         always=True)
            tick = self.make_tick()
            conn = None
            try:
                conn = self.client_data(tick)
                sent = send_file(conn, out, 0, self.ftp["data_timeout"], tick, False)
                self.bytes_down += sent
            except Aborted:
                code = 426
                if conn:
                    conn.close()
                return self.abort_reply()
            except DataError as e:
                if conn:
                    conn.close()
                code = 425 if conn is None else 426
                return self.r(code, "Data connection failed: %s" % e)
            finish(conn)
            self.phase("send")
            code = 226
            self.r(226, *(notes + ["Transfer complete"]))
        finally:
            if served is not None:
                self.drop_spool(served, spath)
            self.drop_spool(f, fpath)
            self.log_transfer("RETR", t.arg, direction, size, verdict, decision, qid, code)

    def too_big(self, e, upload):
        """Verdict and decision for a transfer cut off at [scanner] max_size:
        refused whatever on_unscannable says (552 up, 550 down), since the
        proxy never holds more than max_size of it (no quarantine copy)."""
        from scanlib.policy import Decision
        from scanlib.verdict import Unscannable, SIZE_LIMIT
        v = Unscannable(SIZE_LIMIT, "%s: %s" % ("upload" if upload else "download", e))
        return v, Decision("unscannable", "reject", 552 if upload else 550, None)

    def stor(self, t):
        from ftpproxy.data import DataError, Aborted, TooBig, recv_to_file, send_file, finish
        direction = self.direction(upload=True)
        self.view = self.conf.view("ftp", direction)
        progress = Progress(self, False, self.view["progress_interval"], t.arg)
        tick = self.make_tick(progress)
        try:
            f, fpath = self.spool_file()
        except OSError as e:
            self.log.error("spool: %s", e)
            return self.r(451, "Local error: no spool space, try again later")
        verdict = decision = qid = None
        code = None
        size = existing = 0
        max_size = self.conf["scanner"]["max_size"]
        self.phases, self.phase_start = [], time.monotonic()
        try:
            if t.verb == "APPE":
                # The whole file must be scanned: fetch what is there first.
                try:
                    existing, err = self.fetch(t.arg, f, None, tick, limit=max_size)
                except Aborted:
                    code = 426
                    self.abort_upstream()
                    return self.abort_reply()
                except TooBig as e:
                    verdict, decision = self.too_big("existing file: %s" % e, upload=True)
                    code = 552
                    return self.r(552, *(self.notes(t.arg, verdict, decision, None)
                                         + ["APPE refused: the whole file would be larger "
                                            "than [scanner] max_size"]))
                if err is not None:
                    code = 550
                    return self.r(550, "APPE refused: the existing file could not be fetched "
                                       "to scan it whole (server said: %s)"
                                  % self.safe(err[:200].split(b"\r\n")[0]))
            self.r(150, "Ok to send data")
            conn = None
            progress.server_idle = True
            try:
                conn = self.client_data(tick)
                size = recv_to_file(conn, f, self.ftp["data_timeout"], tick,
                                    ascii=self.session.type == "A",
                                    limit=max_size - existing)
                self.bytes_up += size
                self.phase("receive")
            except TooBig as e:
                # Stop reading (closing with unread data resets the client's
                # connection): the file could never be scanned whole, so it
                # is refused whatever on_unscannable says, and the spool
                # holds at most max_size of it.
                conn.close()
                verdict, decision = self.too_big(e, upload=True)
                code = 552
                return self.r(552, *(self.notes(t.arg, verdict, decision, None)
                                     + ["Upload refused: larger than [scanner] max_size, "
                                        "cannot be scanned; nothing stored"]))
            except Aborted:
                code = 426
                if conn:
                    conn.close()
                return self.abort_reply()
            except DataError as e:
                if conn:
                    conn.close()
                code = 425 if conn is None else 426
                return self.r(code, "Upload failed, nothing stored: %s" % e)
            conn.close()
            try:
                verdict = self.scan(f, t.arg, progress, tick)
                self.phase("scan")
            except Aborted:
                code = 426
                return self.abort_reply()
            decision = self.decide(verdict, upload=True)
            qid, qerr = self.settle(f, t.verb, t.arg, direction, verdict, decision)
            notes = self.notes(t.arg, verdict, decision, qid)
            if qerr is not None:
                code = 451
                return self.r(451, *(notes + ["Quarantine unavailable, try again later"]))
            if decision.action != "pass":
                code = decision.code
                final = {"tempfail": "Virus scanner unavailable, try again later"}.get(
                    decision.action, "Upload refused: %s" % decision.cause)
                return self.r(code, *(notes + [final]))
            # Upload what was scanned.
            progress.server_idle = False
            dsock, err = self.up.open_data()
            if err is not None:
                code = err.code
                return self.r(err.code, *(notes + [b.decode("utf-8", "replace")
                                                   for b in err.body_lines()]))
            # APPE too is sent as STOR of the whole scanned file: an APPE
            # would add the new part to whatever the server holds by now,
            # which another session may have changed since the fetch.
            r = self.up.transfer_command(b"STOR " + t.arg)
            if not 100 <= r.code < 200:
                dsock.close()
                code = r.code
                return self.r(r.code, *(notes + [b.decode("utf-8", "replace")
                                                  for b in r.body_lines()]))
            try:
                send_file(dsock, f, 0, self.ftp["data_timeout"], self.make_tick(), False)
            except Aborted:
                # the server holds a partial copy of a clean file; tell it to stop
                dsock.close()
                code = 426
                self.abort_upstream()
                return self.abort_reply()
            except DataError as e:
                dsock.close()
                final = self.up.final_reply()
                code = 451
                return self.r(451, *(notes + ["Upload to the server failed: %s" % e]))
            finish(dsock)
            final = self.up.final_reply()
            self.phase("upload")
            code = final.code
            self.r(final.code, *(notes + [b.decode("utf-8", "replace")
                                          for b in final.body_lines()]))
        finally:
            self.drop_spool(f, fpath)
            self.log_transfer(t.verb, t.arg, direction, size, verdict, decision, qid, code)

    view = None

    def spool_file(self):
        """A spool file; dropped with drop_spool() when the transfer ends.
        (Spool.forget() cannot find a file by name: os.fdopen files are
        named by their descriptor, so the path is taken from Spool.paths.)"""
        f = self.spool.create()
        return f, self.spool.paths[-1]

    def drop_spool(self, f, path):
        try:
            f.close()
        except OSError:
            pass
        try:
            os.unlink(path)
        except OSError:
            pass
        if path in self.spool.paths:
            self.spool.paths.remove(path)

    def close(self):
        from scanlib.log import summary
        self.close_listener()
        if self.up is not None:
            self.up.close(quit=True)
        if self.spool is not None:
            self.spool.cleanup()
        self.log.info(summary(
            id=self.sid, event="session", client=self.client, user=self.session.user,
            server=self.server_name, transfers=self.ntransfers, bytes_up=self.bytes_up,
            bytes_down=self.bytes_down, seconds="%.3f" % (time.monotonic() - self.started),
            result=self.result))


def _logger(conf, debug):
    from scanlib import log as vlog
    if conf is None:
        return vlog.setup(IDENT, "", debug)
    return vlog.setup(IDENT, conf["log"]["file"], debug, conf["log"].get("level", "info"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from scanlib.config import proxy_args
    try:
        path, debug = proxy_args(argv, IDENT)
    except ValueError:
        quiet_stderr()
        os.write(1, reply(421, "Proxy misconfigured (bad arguments)"))
        return 64
    if not debug:
        quiet_stderr()
    ctl = Control()
    from scanlib import config
    try:
        conf = config.load(path)
    except config.ConfigError as e:
        log = _logger(None, debug)
        for p in e.problems:
            log.error("config: %s", p)
        try:
            ctl.send(reply(421, "Service not available: proxy configuration error"))
        except ClientGone:
            pass
        return 78
    ftp = conf.view("ftp")
    up = None
    if ftp["upstream"].startswith("command:"):
        # spawned before the privilege drop (vsftpd needs root to start)
        from ftpproxy.upstream import UpstreamError, spawn_command
        try:
            up = spawn_command(ftp["upstream"], ftp["timeout"])
        except UpstreamError as e:
            _logger(conf, debug).error("upstream: %s", e)
            _send_quietly(ctl, reply(421, "Service not available: cannot start the FTP server"))
            return 69
    from scanlib import privs
    try:
        privs.drop(conf.get("user", ""))
    except privs.PrivilegeError as e:
        _logger(conf, debug).error("privileges: %s", e)
        _send_quietly(ctl, reply(421, "Service not available"))
        if up is not None:
            up.close()
        return 77
    # Greet first: logging and everything heavier is imported after the 220.
    hostname = ftp.get("hostname") or ""
    if not _send_quietly(ctl, reply(220, "%svirusgw FTP proxy ready%s" % (
            hostname + " " if hostname else "",
            ": login as USER name@host[:port]" if ftp["upstream"] == "userhost" else ""))):
        if up is not None:
            up.close()
        return 0
    log = _logger(conf, debug)
    from scanlib.spool import install_signal_cleanup
    install_signal_cleanup()
    proxy = None
    try:
        proxy = Proxy(conf, ctl, log, debug)
        if up is not None:
            proxy.up = up
            proxy.server_name = up.name
            up = None
        proxy.run()
        return 0
    except ClientGone:
        return 0
    except Exception as e:            # never a traceback to the client
        log.exception("internal error: %r", e)
        _send_quietly(ctl, reply(421, "Internal error, closing connection"))
        return 70
    finally:
        if up is not None:
            up.close()
        if proxy is not None:
            try:
                proxy.close()
            except Exception:
                pass


def _send_quietly(ctl, data):
    try:
        ctl.send(data)
        return True
    except ClientGone:
        return False
