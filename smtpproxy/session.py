"""The SMTP session, sans I/O.

Session.line(raw) takes one command line from the client (bytes, with its
line end) and returns an action for the main loop:

  Send(data, close)       write these reply bytes to the client (then close)
  Relay(kind, command)    send command upstream, read its reply, and call
                          Session.upstream(kind, code, lines) for the next
                          action (which may be another Relay)
  StartData()             answer 354, read the body (datareader), scan,
                          decide; then Session.end_transaction()

The command table (COMMANDS) is the whole protocol: a verb not in it is
"500 unrecognized", a verb in it but refused by policy (BDAT, XCLIENT,
AUTH, STARTTLS without TLS) gets its 502.  Per-connection state (helo,
extensions, error count) is kept apart from per-transaction state
(sender, recipients).

What this module does not do: I/O, timeouts (main), the DATA body
(datareader), scanning or decisions (scanlib.policy).
"""

from smtpproxy import replies as R
from smtpproxy.address import (BadAddress, parse_path, parse_params, relay_allowed,
                               split_command_arg)

MAX_LINE = 2048      # RFC 5321 4.5.3.1.4 (512) + room for ESMTP parameters (RFC 1869 6)

# States.  DATA is not a state here: main owns the body.
START, READY, MAIL, RCPT = "start", "ready", "mail", "rcpt"
# Extensions the proxy implements (and offers when the upstream does too).
IMPLEMENTED = ("SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN")
# Never shown to the client, whatever the upstream offers.
NEVER = ("CHUNKING", "BINARYMIME", "XCLIENT", "XFORWARD", "STARTTLS", "AUTH", "PIPELINING")


class Send:
    __slots__ = ("data", "close")

    def __init__(self, data, close=False):
        self.data, self.close = data, close

    def __repr__(self):
        return "Send(%r%s)" % (self.data, ", close" if self.close else "")


class Relay:
    __slots__ = ("kind", "command")

    def __init__(self, kind, command):
        self.kind, self.command = kind, command

    def __repr__(self):
        return "Relay(%r, %r)" % (self.kind, self.command)


class StartData:
    __slots__ = ()

    def __repr__(self):
        return "StartData()"


class StartTLS:
    """Answer 220, then the TLS handshake on the client socket; then
    Session.tls_started()."""
    __slots__ = ()

    def __repr__(self):
        return "StartTLS()"


class Settings:
    """What a session needs to know, from the config view and the peer."""

    def __init__(self, hostname="localhost", inside=False, local_domains=(),
                 max_size=52428800, max_recipients=1000, max_errors=20,
                 client_addr="", client_port=0, tls=False):
        self.hostname = hostname
        self.inside = inside
        self.local_domains = list(local_domains)
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.max_errors = max_errors
        self.client_addr = client_addr
        self.client_port = client_port
        self.tls = tls              # a certificate and key are configured: offer STARTTLS


class Session:
    def __init__(self, settings):
        self.s = settings
        # per connection
        self.state = START
        self.helo = ""
        self.esmtp = False
        self.upstream_ext = {}      # keyword -> params text, from the upstream's EHLO
        self.offered = {}           # what we offered the client
        self.errors = 0
        self.transactions = 0
        self.tls_active = False
        self._pending = None        # the client's EHLO/HELO reply while XFORWARD/XCLIENT run
        # per transaction
        self.reset_transaction()

    # -- transaction state ---------------------------------------------------
    def reset_transaction(self):
        self.sender = None
        self.recipients = []
        self.mail_params = []
        self.utf8 = False
        self._cand = None           # the path of the MAIL/RCPT waiting for its upstream reply
        if self.state in (MAIL, RCPT):
            self.state = READY

    def end_transaction(self):
        """Called by main after the DATA outcome was replied."""
        self.transactions += 1
        self.reset_transaction()

    @property
    def in_transaction(self):
        return self.state in (MAIL, RCPT)

    @property
    def size_limit(self):
        """Bytes the DATA reader accepts: ours, or the upstream's if lower."""
        up = self.upstream_ext.get("SIZE")
        try:
            up = int(up) if up else 0
        except ValueError:
            up = 0
        return min(self.s.max_size, up) if up > 0 else self.s.max_size

    # -- entry points ----------------------------------------------------------
    def greeting(self):
        return Send(R.GREETING.wire(self.s.hostname))

    def too_long(self):
        """main read a command line longer than MAX_LINE (and drained it)."""
        return self._error(R.LINE_TOO_LONG)

    def line(self, raw):
        """One client line, bytes ending in LF (main splits at LF)."""
        if not raw.endswith(b"\r\n") or b"\r" in raw[:-2] or b"\n" in raw[:-2] \
                or b"\0" in raw:
            return self._error(R.BAD_LINE)
        text = raw[:-2].decode("utf-8", "surrogateescape")
        verb, _, arg = text.partition(" ")
        entry = COMMANDS.get(verb.upper()) if verb.isascii() else None
        if entry is None:
            return self._error(R.UNKNOWN)
        return entry(self, arg)

    def _error(self, reply, *fmt):
        self.errors += 1
        if self.errors >= self.s.max_errors:
            return Send(R.TOO_MANY_ERRORS.wire(self.s.hostname), close=True)
        return Send(reply.wire(*fmt))

    # -- commands --------------------------------------------------------------
    def cmd_helo(self, arg, esmtp=False):
        name = arg.strip()
        if not name or " " in name or not name.isprintable() or len(name) > 255:
            return self._error(R.BAD_HELO)
        self.reset_transaction()
        self.helo, self.esmtp = name, esmtp
        return Relay("EHLO" if esmtp else "HELO",
                     ("%s %s\r\n" % ("EHLO" if esmtp else "HELO", name)).encode(
                         "utf-8", "surrogateescape"))

    def cmd_ehlo(self, arg):
        return self.cmd_helo(arg, esmtp=True)

    def cmd_mail(self, arg):
        if self.state == START:
            return self._error(R.NEED_HELO)
        if self.state != READY:
            return self._error(R.NESTED_MAIL)
        try:
            path_text, words = split_command_arg(arg, "FROM")
            params = parse_params(words)
        except BadAddress:
            return self._error(R.SYNTAX)
        out = []
        utf8 = False
        for k, v in params:
            if not self.esmtp:
                return self._error(R.PARAM_UNKNOWN)
            if k == "SIZE" and "SIZE" in self.offered:
                if not (v and v.isdigit() and len(v) < 20):
                    return self._error(R.SYNTAX)
                if int(v) > self.size_limit:
                    return Send(R.SIZE_EXCEEDED.wire())
                if "SIZE" in self.upstream_ext:
                    out.append("SIZE=" + v)
            elif k == "BODY" and v and v.upper() in ("7BIT", "8BITMIME") \
                    and (v.upper() == "7BIT" or "8BITMIME" in self.offered):
                out.append("BODY=" + v.upper())
            elif k == "SMTPUTF8" and v is None and "SMTPUTF8" in self.offered:
                utf8 = True
                out.append("SMTPUTF8")
            elif k in ("RET", "ENVID") and v and "DSN" in self.offered:
                if k == "RET" and v.upper() not in ("FULL", "HDRS"):
                    return self._error(R.SYNTAX)
                out.append("%s=%s" % (k, v))
            else:
                return self._error(R.PARAM_UNKNOWN)
        try:
            path = parse_path(_valid_utf8(path_text), utf8=utf8, allow_null=True)
        except BadAddress:
            return self._error(R.BAD_PATH)
        self._cand = path
        self.utf8 = utf8
        self.mail_params = out
        return Relay("MAIL", _cmd("MAIL FROM:<%s>" % path.mailbox, out))

    def cmd_rcpt(self, arg):
        if self.state not in (MAIL, RCPT):
            return self._error(R.NEED_HELO if self.state == START else R.NEED_MAIL)
        try:
            path_text, words = split_command_arg(arg, "TO")
            params = parse_params(words)
        except BadAddress:
            return self._error(R.SYNTAX)
        out = []
        for k, v in params:
            if k in ("NOTIFY", "ORCPT") and v and "DSN" in self.offered:
                out.append("%s=%s" % (k, v))
            else:
                return self._error(R.PARAM_UNKNOWN)
        try:
            path = parse_path(_valid_utf8(path_text), utf8=self.utf8)
        except BadAddress:
            return self._error(R.BAD_RCPT_PATH)
        why = relay_allowed(path, self.s.inside, self.s.local_domains)
        # Relay denials count toward max_errors, as Postfix's
        # smtpd_hard_error_limit does: a relay prober is cut off with 421.
        if why == "localpart":
            return self._error(R.LOCALPART_DENIED)
        if why:
            return self._error(R.RELAY_DENIED)
        if len(self.recipients) >= self.s.max_recipients:
            return Send(R.TOO_MANY_RCPTS.wire())
        self._cand = path
        return Relay("RCPT", _cmd("RCPT TO:<%s>" % path.mailbox, out))

    def cmd_data(self, arg):
        if arg:
            return self._error(R.SYNTAX)
        if self.state == START:
            return self._error(R.NEED_HELO)
        if self.state == READY:
            return self._error(R.NEED_MAIL)
        if self.state == MAIL:
            return self._error(R.NEED_RCPT)
        return StartData()

    def cmd_rset(self, arg):
        if arg:
            return self._error(R.SYNTAX)
        if self.in_transaction:
            self.reset_transaction()
            return Relay("RSET", b"RSET\r\n")
        self.reset_transaction()
        return Send(R.RSET_OK.wire())

    def cmd_noop(self, arg):
        return Send(R.NOOP_OK.wire())

    def cmd_quit(self, arg):
        return Send(R.BYE.wire(), close=True)

    def cmd_help(self, arg):
        return Send(R.HELP.wire())

    def cmd_vrfy(self, arg):
        if not arg:
            return self._error(R.SYNTAX)
        return Send(R.VRFY.wire())

    def cmd_starttls(self, arg):
        if "STARTTLS" not in self.offered:
            return self._error(R.TLS_NOT_OFFERED if not self.tls_active else R.TLS_ACTIVE)
        if arg:
            return self._error(R.SYNTAX)
        if self.in_transaction:
            return self._error(R.TLS_IN_TRANSACTION)
        return StartTLS()

    def tls_started(self):
        """RFC 3207 4.2: after the handshake everything learnt before is
        forgotten; the client starts again with EHLO."""
        self.tls_active = True
        self.reset_transaction()
        self.state = START
        self.helo = ""
        self.esmtp = False
        self.offered = {}

    def cmd_bdat(self, arg):
        return self._error(R.BDAT_REFUSED)

    def cmd_xclient(self, arg):
        return self._error(R.XCLIENT_REFUSED)

    def cmd_not_implemented(self, arg):
        return self._error(R.NOT_IMPL)

    # -- the upstream's replies -----------------------------------------------
    def upstream(self, kind, code, lines):
        """The upstream answered the Relay of `kind`: the next action."""
        passthrough = Send(R.reply(code, lines))
        if kind in ("EHLO", "HELO", "EHLO-AGAIN", "HELO-AGAIN"):
            return self._after_helo(kind, code, lines)
        if kind in ("XFORWARD", "XCLIENT"):
            return self._after_forward(kind, code, lines)
        if kind == "MAIL":
            if 200 <= code < 300:
                self.sender = self._cand
                self.state = MAIL
            return passthrough
        if kind == "RCPT":
            if 200 <= code < 300:
                self.recipients.append(self._cand)
                self.state = RCPT
            return passthrough
        return passthrough                      # RSET and anything else

    def _after_helo(self, kind, code, lines):
        if kind in ("EHLO", "EHLO-AGAIN") and 500 <= code < 600:
            # An upstream that refuses EHLO (a very old MTA): HELO, no extensions.
            return Relay("HELO", ("HELO %s\r\n" % self.helo).encode("utf-8", "surrogateescape"))
        if not 200 <= code < 300:
            self.state = START
            return Send(R.reply(code, lines))
        again = kind.endswith("-AGAIN")
        if not again:
            self.upstream_ext = parse_ehlo(lines) if kind == "EHLO" else {}
        self.state = READY
        if self.esmtp:
            self.offered = self._offer()
            ext = [(k + " " + v).strip() for k, v in self.offered.items()]
            head = "%s hello %s" % (self.s.hostname, self.helo)
            self._pending = Send(R.reply(250, [head] + ext))
        else:
            self.offered = {}
            self._pending = Send(R.HELO_OK.wire(self.s.hostname, self.helo))
        if again:
            return self._take_pending()
        fwd = self._forward_command()
        return fwd if fwd is not None else self._take_pending()

    def _after_forward(self, kind, code, lines):
        # A refused XFORWARD/XCLIENT is not fatal: the MTA just sees the proxy.
        if kind == "XCLIENT" and code == 220:
            # RFC-less but Postfix-defined: XCLIENT restarts the session: EHLO again.
            verb = "EHLO" if self.esmtp else "HELO"
            return Relay("EHLO-AGAIN" if self.esmtp else "HELO-AGAIN",
                         ("%s %s\r\n" % (verb, self.helo)).encode("utf-8", "surrogateescape"))
        return self._take_pending()

    def _take_pending(self):
        p, self._pending = self._pending, None
        return p

    def _forward_command(self):
        """XFORWARD (preferred: no session restart) or XCLIENT, when offered."""
        addr = self.s.client_addr
        if not addr:
            return None
        a = ("IPV6:" + addr) if ":" in addr else addr
        helo = _xtext_safe(self.helo)
        if "XFORWARD" in self.upstream_ext:
            attrs = self.upstream_ext["XFORWARD"].upper().split()
            parts = [("ADDR", a), ("PORT", str(self.s.client_port)), ("HELO", helo),
                     ("PROTO", "ESMTP" if self.esmtp else "SMTP")]
            words = ["%s=%s" % (k, v) for k, v in parts if k in attrs and v]
            if words:
                return Relay("XFORWARD", ("XFORWARD %s\r\n" % " ".join(words)).encode("ascii"))
        if "XCLIENT" in self.upstream_ext:
            attrs = self.upstream_ext["XCLIENT"].upper().split()
            parts = [("ADDR", a), ("PORT", str(self.s.client_port)), ("HELO", helo),
                     ("PROTO", "ESMTP" if self.esmtp else "SMTP")]
            words = ["%s=%s" % (k, v) for k, v in parts if k in attrs and v]
            if words:
                return Relay("XCLIENT", ("XCLIENT %s\r\n" % " ".join(words)).encode("ascii"))
        return None

    def _offer(self):
        up = self.upstream_ext
        # SIZE always (RFC 1870): our limit, or the upstream's when it is
        # lower and not 0 (size_limit); a client then learns the limit
        # before sending instead of at the end of DATA.
        out = {"PIPELINING": "", "SIZE": str(self.size_limit)}
        for k in ("8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"):
            if k in up:
                out[k] = ""
        if self.s.tls and not self.tls_active:
            out["STARTTLS"] = ""            # ours: the proxy terminates TLS itself
        return out


def _valid_utf8(text):
    """The line was decoded with surrogateescape: bytes that are not UTF-8
    (invalid sequences, encoded surrogates, truncations) are lone
    surrogates now.  A path holding any is refused (RFC 6531 3.3), never
    relayed as raw bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadAddress("not UTF-8")
    return text


def _cmd(head, params):
    return (" ".join([head] + list(params)) + "\r\n").encode("utf-8", "surrogateescape")


def _xtext_safe(text):
    """HELO name as an xtext-safe word (RFC 3461 xtext, + and = encoded)."""
    out = []
    for c in text:
        o = ord(c)
        if 33 <= o <= 126 and c not in "+=":
            out.append(c)
        else:
            out.append("+%02X" % (o & 0xff))
    return "".join(out)


def parse_ehlo(lines):
    """The upstream's EHLO reply lines (first is the greeting) -> {KEYWORD:
    params}, with the keywords we never pass on kept too (main needs
    XFORWARD/XCLIENT); _offer() decides what the client sees."""
    ext = {}
    for line in lines[1:]:
        if isinstance(line, bytes):
            line = line.decode("ascii", "replace")
        kw, _, params = line.strip().partition(" ")
        if kw:
            ext[kw.upper()] = params.strip()
    return ext


# The command table: verb -> handler.  Nothing else is ever a command.
COMMANDS = {
    "HELO": Session.cmd_helo,
    "EHLO": Session.cmd_ehlo,
    "MAIL": Session.cmd_mail,
    "RCPT": Session.cmd_rcpt,
    "DATA": Session.cmd_data,
    "RSET": Session.cmd_rset,
    "NOOP": Session.cmd_noop,
    "QUIT": Session.cmd_quit,
    "HELP": Session.cmd_help,
    "VRFY": Session.cmd_vrfy,
    "STARTTLS": Session.cmd_starttls,
    "BDAT": Session.cmd_bdat,
    "XCLIENT": Session.cmd_xclient,
    "XFORWARD": Session.cmd_xclient,
    "AUTH": Session.cmd_not_implemented,
    "EXPN": Session.cmd_not_implemented,
    "ETRN": Session.cmd_not_implemented,
    "TURN": Session.cmd_not_implemented,
}
