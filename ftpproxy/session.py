"""The FTP control session, sans I/O.

Three parts, none of which touches a socket:

LineReader  turns the client's bytes into command lines.  Telnet IAC
            sequences are removed first (IAC IAC is a literal 0xFF; IAC IP,
            IAC DM and option negotiation vanish), so 'IAC IP IAC DM ABOR'
            from a BSD client is plain ABOR.  Only CRLF ends a line; a bare
            CR, a bare LF or a NUL stays inside the line, where parse()
            refuses it (501): one line is never split into two commands.
            Lines are bounded (MAX_LINE); a longer one is drained to its
            CRLF and answered 500 so the dialogue stays in step.

parse()     splits a line into an upper-case verb and the argument as
            bytes (file names need not be UTF-8; they are relayed as sent).

Session     the command table and the state.  handle(line) returns one
            action (a reply to send, a command to relay, or an operation
            the main loop performs: login, passive/active set-up, a
            transfer, quit).  A verb that is not in COMMANDS is refused; a
            verb is never dispatched by name lookup.

States: INIT (no upstream login started), AUTH (USER sent upstream, login
not finished), READY (the server said 230).  The table says, per verb, in
which states it may be used, whether it needs an argument, and what
happens to it.
"""

from collections import namedtuple

from ftpproxy.replies import reply

MAX_LINE = 2048          # bytes of one command line, CRLF excluded

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240


class LineReader:
    """Bytes in, events out: ('line', bytes) or ('too-long', None)."""

    def __init__(self, limit=MAX_LINE):
        self.limit = limit
        self.buf = bytearray()
        self.telnet = 0          # 0 data, 1 after IAC, 2 option byte, 3 in SB, 4 IAC in SB
        self.draining = False

    def _strip_telnet(self, data):
        if self.telnet == 0 and IAC not in data:
            return data
        out = bytearray()
        st = self.telnet
        for b in data:
            if st == 0:
                if b == IAC:
                    st = 1
                else:
                    out.append(b)
            elif st == 1:
                if b == IAC:
                    out.append(IAC)
                    st = 0
                elif DONT >= b >= WILL:
                    st = 2
                elif b == SB:
                    st = 3
                else:            # IP, DM, AO, AYT, NOP, ...: dropped
                    st = 0
            elif st == 2:
                st = 0
            elif st == 3:
                if b == IAC:
                    st = 4
            else:                # st == 4
                st = 0 if b == SE else 3
        self.telnet = st
        return bytes(out)

    def feed(self, data):
        self.buf += self._strip_telnet(data)
        events = []
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                if self.draining:
                    # keep a trailing CR: it may pair with the next LF
                    keep = 1 if self.buf.endswith(b"\r") else 0
                    del self.buf[:len(self.buf) - keep]
                elif len(self.buf) > self.limit + 1:
                    self.draining = True
                    del self.buf[:-1]
                return events
            if self.draining or i > self.limit:
                events.append(("too-long", None))
                self.draining = False
            else:
                events.append(("line", bytes(self.buf[:i])))
            del self.buf[:i + 2]

    @property
    def pending(self):
        """Bytes of an unfinished line are waiting."""
        return bool(self.buf) or self.draining


class CommandError(Exception):
    def __init__(self, code, text):
        Exception.__init__(self, text)
        self.code = code
        self.text = text


def parse(line):
    """(verb, arg) from one line; arg is bytes (b'' when absent).
    Raises CommandError."""
    if b"\r" in line or b"\n" in line or b"\0" in line:
        raise CommandError(501, "Syntax error (control character in command)")
    verb, sp, arg = line.partition(b" ")
    if not (3 <= len(verb) <= 4) or not verb.isalpha() or not verb.isascii():
        raise CommandError(500, "Syntax error, command unrecognized")
    return verb.decode("ascii").upper(), arg


# -- the command table -------------------------------------------------------

INIT, AUTH, READY = "init", "auth", "ready"
ALL = frozenset((INIT, AUTH, READY))
LOGGED = frozenset((READY,))
LOGIN = frozenset((INIT, AUTH))

NO, REQ, OPT = "no", "required", "optional"

# kind: relay (send the line upstream, relay the reply), login, local (the
# proxy answers), passive, active, transfer, refuse (fixed reply).
Cmd = namedtuple("Cmd", "kind states arg note")

COMMANDS = {
    # login
    "USER": Cmd("login", LOGIN, REQ, "USER name[@host[:port]] (userhost mode)"),
    "PASS": Cmd("relay", frozenset((AUTH,)), OPT, "password, relayed, never logged"),
    "ACCT": Cmd("relay", frozenset((AUTH, READY)), REQ, "account"),
    "QUIT": Cmd("quit", ALL, NO, "end the session"),
    # answered by the proxy
    "NOOP": Cmd("local", ALL, NO, "keep-alive"),
    "FEAT": Cmd("feat", ALL, NO, "features the proxy supports"),
    "TYPE": Cmd("type", ALL, REQ, "A, A N, I, L 8: the proxy converts"),
    "MODE": Cmd("mode", ALL, REQ, "S only"),
    "STRU": Cmd("stru", ALL, REQ, "F only"),
    "ALLO": Cmd("local", LOGGED, OPT, "not needed"),
    "REST": Cmd("rest", LOGGED, REQ, "restart offset for the next RETR"),
    "ABOR": Cmd("abort", ALL, NO, "abort the transfer"),
    "OPTS": Cmd("opts", ALL, REQ, "UTF8 ON / MLST facts"),
    # data connections
    "PASV": Cmd("passive", LOGGED, NO, "IPv4 passive"),
    "EPSV": Cmd("passive", LOGGED, OPT, "extended passive (RFC 2428)"),
    "PORT": Cmd("active", LOGGED, REQ, "IPv4 active, client's own address only"),
    "EPRT": Cmd("active", LOGGED, REQ, "extended active, client's own address only"),
    # transfers
    "RETR": Cmd("transfer", LOGGED, REQ, "download: fetched, scanned, then sent"),
    "STOR": Cmd("transfer", LOGGED, REQ, "upload: received, scanned, then stored"),
    "APPE": Cmd("transfer", LOGGED, REQ, "append: scanned with the existing file"),
    "LIST": Cmd("transfer", LOGGED, OPT, "listing, not scanned"),
    "NLST": Cmd("transfer", LOGGED, OPT, "listing, not scanned"),
    "MLSD": Cmd("transfer", LOGGED, OPT, "listing, not scanned"),
    "STOU": Cmd("refuse", LOGGED, OPT, "502: see ftpproxy.main"),
    # relayed when logged in
    "CWD": Cmd("relay", LOGGED, REQ, ""), "XCWD": Cmd("relay", LOGGED, REQ, ""),
    "CDUP": Cmd("relay", LOGGED, NO, ""), "XCUP": Cmd("relay", LOGGED, NO, ""),
    "PWD": Cmd("relay", LOGGED, NO, ""), "XPWD": Cmd("relay", LOGGED, NO, ""),
    "MKD": Cmd("relay", LOGGED, REQ, ""), "XMKD": Cmd("relay", LOGGED, REQ, ""),
    "RMD": Cmd("relay", LOGGED, REQ, ""), "XRMD": Cmd("relay", LOGGED, REQ, ""),
    "DELE": Cmd("relay", LOGGED, REQ, ""),
    "RNFR": Cmd("relay", LOGGED, REQ, ""), "RNTO": Cmd("relay", LOGGED, REQ, ""),
    "SIZE": Cmd("relay", LOGGED, REQ, ""), "MDTM": Cmd("relay", LOGGED, REQ, ""),
    "MLST": Cmd("relay", LOGGED, OPT, ""),
    "SYST": Cmd("relay", LOGGED, NO, ""),
    "STAT": Cmd("relay", LOGGED, OPT, "over the control connection"),
    "HELP": Cmd("relay", LOGGED, OPT, ""),
    "SITE": Cmd("site", LOGGED, REQ, "only the verbs in [ftp] site_allow"),
    # refused
    "AUTH": Cmd("refuse", ALL, OPT, "no TLS"), "PBSZ": Cmd("refuse", ALL, OPT, "no TLS"),
    "PROT": Cmd("refuse", ALL, OPT, "no TLS"), "CCC": Cmd("refuse", ALL, OPT, "no TLS"),
    "ADAT": Cmd("refuse", ALL, OPT, "no TLS"),
    "REIN": Cmd("refuse", ALL, OPT, "not supported"),
    "SMNT": Cmd("refuse", ALL, OPT, "not supported"),
    "LPRT": Cmd("refuse", ALL, OPT, "use EPRT"), "LPSV": Cmd("refuse", ALL, OPT, "use EPSV"),
}

REFUSALS = {
    "AUTH": (502, "TLS is not supported by this proxy"),
    "PBSZ": (502, "TLS is not supported by this proxy"),
    "PROT": (502, "TLS is not supported by this proxy"),
    "CCC": (502, "TLS is not supported by this proxy"),
    "ADAT": (502, "TLS is not supported by this proxy"),
    "REIN": (502, "REIN not implemented"),
    "SMNT": (502, "SMNT not implemented"),
    "LPRT": (502, "LPRT not implemented, use EPRT"),
    "LPSV": (502, "LPSV not implemented, use EPSV"),
    "STOU": (502, "STOU not implemented by this proxy: use STOR with a name of your own"),
}

# FEAT lines the proxy can honour (the server's own are intersected with
# RELAYED_FEATS; the data-connection ones are the proxy's own work).
OWN_FEATS = ["EPRT", "EPSV", "PASV", "REST STREAM"]
RELAYED_FEATS = ("SIZE", "MDTM", "MLST", "TVFS", "UTF8", "LANG")


# -- actions -----------------------------------------------------------------

Reply = namedtuple("Reply", "data close")                   # bytes to send; close after?
Relay = namedtuple("Relay", "verb line")                    # send line upstream, relay reply
Login = namedtuple("Login", "user host port line")          # connect if needed, send line
Passive = namedtuple("Passive", "extended")                 # open a listener, reply 227/229
Active = namedtuple("Active", "verb address port")          # remember, reply 200
Transfer = namedtuple("Transfer", "verb arg rest")          # data transfer
Feat = namedtuple("Feat", "")
Abort = namedtuple("Abort", "")


def _r(code, *text, close=False):
    return Reply(reply(code, *text), close)


class Session:
    """State of one control connection; see the module docstring."""

    def __init__(self, mode="userhost", client="", site_allow=(), passive_ok=True):
        self.mode = mode                  # userhost | tcp | command
        self.client = client              # the client's address (text)
        self.site_allow = {s.upper() for s in site_allow}
        self.state = INIT
        self.type = "A"                   # the client's TYPE: A or I
        self.rest = 0
        self.data = None                  # None | "passive" | ("active", addr, port)
        self.epsv_all = False
        self.target = None                # (host, port) chosen at login (userhost)
        self.user = ""

    # The main loop tells the session what happened.
    def upstream_reply(self, verb, code):
        """The server answered a relayed/login command."""
        if verb in ("USER", "PASS", "ACCT"):
            if code == 230:
                self.state = READY
            elif code in (331, 332):
                self.state = AUTH
            elif code >= 400 and verb == "PASS":
                self.state = AUTH if self.state != READY else READY

    def passive_opened(self):
        self.data = "passive"

    def transfer_done(self):
        self.data = None
        self.rest = 0

    def handle(self, line):
        """One command line (bytes, no CRLF) -> one action."""
        try:
            verb, arg = parse(line)
        except CommandError as e:
            return _r(e.code, e.text)
        cmd = COMMANDS.get(verb)
        if cmd is None:
            return _r(500, "Command not understood")
        if self.state not in cmd.states:
            if self.state == READY and verb == "USER":
                return _r(503, "Already logged in")
            if self.state == READY and verb == "PASS":
                return _r(503, "Already logged in")
            if verb == "PASS":
                return _r(503, "Login with USER first")
            return _r(530, "Please login with USER and PASS")
        if cmd.arg == REQ and not arg.strip():
            return _r(501, "Syntax error: %s needs an argument" % verb)
        if cmd.arg == NO and arg.strip():
            return _r(501, "Syntax error: %s takes no argument" % verb)
        kind = cmd.kind
        if kind == "relay":
            return Relay(verb, line)
        if kind == "refuse":
            return _r(*REFUSALS[verb])
        if kind == "login":
            return self._user(arg, line)
        if kind == "quit":
            return _r(221, "Goodbye", close=True)
        if kind == "local":
            if verb == "ALLO":
                return _r(202, "No storage allocation necessary")
            return _r(200, "NOOP ok")
        if kind == "feat":
            return Feat()
        if kind == "type":
            return self._type(arg)
        if kind == "mode":
            if arg.strip().upper() == b"S":
                return _r(200, "Mode set to S")
            return _r(504, "Only MODE S is supported")
        if kind == "stru":
            if arg.strip().upper() == b"F":
                return _r(200, "Structure set to F")
            return _r(504, "Only STRU F is supported")
        if kind == "rest":
            a = arg.strip()
            if not a.isdigit() or len(a) > 18:
                return _r(501, "Syntax error: REST needs a byte offset")
            self.rest = int(a)
            return _r(350, "Restarting at %d: send RETR (uploads cannot be resumed through "
                           "this proxy)" % self.rest)
        if kind == "abort":
            return Abort()
        if kind == "opts":
            return self._opts(verb, arg, line)
        if kind == "site":
            sub = arg.strip().split(b" ", 1)[0].upper()
            if sub.decode("ascii", "replace") in self.site_allow:
                return Relay(verb, line)
            return _r(502, "SITE %s not allowed by this proxy"
                      % sub.decode("ascii", "replace")[:20])
        if kind == "passive":
            return self._passive(verb, arg)
        if kind == "active":
            return self._active(verb, arg)
        if kind == "transfer":
            return self._transfer(verb, arg)
        return _r(502, "Command not implemented")     # not reached: table kinds above

    def _user(self, arg, line):
        name = arg
        if self.mode == "userhost":
            if b"@" not in arg:
                if self.target is None:
                    return _r(530, "Login as USER name@host[:port]")
                return Login(name.decode("utf-8", "surrogateescape"), None, None, line)
            name, _, hostpart = arg.rpartition(b"@")
            try:
                host, port = split_target(hostpart)
            except ValueError as e:
                return _r(530, "Bad server name: %s" % e)
            if not name:
                return _r(530, "Login as USER name@host[:port]")
            if self.target is not None and (host, port) != self.target:
                return _r(530, "Cannot switch servers within a session")
            self.user = name.decode("utf-8", "surrogateescape")
            return Login(self.user, host, port, b"USER " + name)
        self.user = name.decode("utf-8", "surrogateescape")
        return Login(self.user, None, None, line)

    def _type(self, arg):
        a = arg.strip().upper().split()
        if a in ([b"A"], [b"A", b"N"]):
            self.type = "A"
            return _r(200, "Type set to A")
        if a in ([b"I"], [b"L", b"8"]):
            self.type = "I"
            return _r(200, "Type set to I")
        return _r(504, "Type not supported (use A or I)")

    def _opts(self, verb, arg, line):
        a = arg.strip().upper()
        if a in (b"UTF8 ON", b"UTF8", b"UTF-8 ON"):
            if self.state == READY:
                return Relay(verb, line)
            return _r(200, "UTF8 mode is always on")
        if a.startswith(b"MLST") and self.state == READY:
            return Relay(verb, line)
        return _r(501, "Option not understood")

    def _passive(self, verb, arg):
        a = arg.strip().upper()
        if verb == "EPSV":
            if a == b"ALL":
                self.epsv_all = True
                return _r(200, "EPSV ALL ok: only EPSV from now on")
            if a not in (b"", b"1", b"2"):
                return _r(522, "Network protocol not supported, use (1,2)")
            return Passive(True)
        if self.epsv_all:
            return _r(503, "PASV not allowed after EPSV ALL")
        return Passive(False)

    def _active(self, verb, arg):
        if self.epsv_all:
            return _r(503, "%s not allowed after EPSV ALL" % verb)
        from ftpproxy import addr as _addr      # not on the greeting path
        text = arg.strip().decode("ascii", "replace")
        try:
            if verb == "PORT":
                address, port = _addr.parse_port(text)
            else:
                address, port = _addr.parse_eprt(text)
        except _addr.AddrError as e:
            return _r(e.code, e.text)
        refusal = _addr.check_active(verb, address, port, self.client)
        if refusal:
            return _r(*refusal)
        return Active(verb, address, port)

    def _transfer(self, verb, arg):
        if verb in ("STOR", "APPE") and self.rest:
            self.rest = 0
            return _r(550, "Restart not allowed for uploads: the whole file must be scanned "
                           "(send the whole file with STOR)")
        if self.data is None:
            return _r(425, "Use PORT, EPRT, PASV or EPSV first")
        rest = self.rest if verb == "RETR" else 0
        return Transfer(verb, arg, rest)

    def active_set(self, address, port):
        self.data = ("active", address, port)


def split_target(hostpart):
    """b'host', b'host:port', b'[v6]:port' -> (host text, port).  The host
    must be a plain DNS name or an IP literal: no spaces, controls, or
    other bytes that could change the meaning of a later command."""
    import re
    try:
        text = hostpart.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("non-ASCII server name")
    port = 21
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '['")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError("bad port")
            port = int(rest[1:])
        import ipaddress
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("bad IPv6 address")
    else:
        host, sep, p = text.partition(":")
        if sep:
            if not p.isdigit() or len(p) > 5:
                raise ValueError("bad port")
            port = int(p)
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*\.?$", host) \
                or len(host) > 253:
            raise ValueError("not a host name")
    if not 0 < port < 65536:
        raise ValueError("bad port")
    return host, port
