"""SMTP replies: every reply the proxy itself makes, named, with its
enhanced status code (RFC 3463), and the one function that formats a
reply (single or multi-line) for the wire.

Replies from the upstream are passed through reply() too, so that a
garbled upstream line can never reach the client as-is: text is reduced to
printable ASCII and each line is bounded.
"""

MAX_TEXT = 400          # per reply line, well under the 512-octet reply limit


def _clean(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    out = "".join(c if " " <= c <= "~" else "?" for c in text)
    return out[:MAX_TEXT]


MAX_SHOWN = 512        # bytes of one dialogue line in the debug log


def shown(data):
    """A dialogue line (bytes or str) for the debug log: the line end
    dropped, printable ASCII kept, backslash and every other byte as \\xNN
    (hostile bytes never reach the log raw), at most MAX_SHOWN bytes."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    data = data.rstrip(b"\r\n")
    cut = len(data) > MAX_SHOWN
    text = "".join(chr(b) if 32 <= b <= 126 and b != 92 else "\\x%02x" % b
                   for b in data[:MAX_SHOWN])
    return text + "..." if cut else text


def reply(code, lines):
    """bytes for one reply: code (int) and text lines (str or list)."""
    if isinstance(lines, (str, bytes)):
        lines = [lines]
    lines = [_clean(x) for x in lines] or [""]
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append("%03d%s%s\r\n" % (code, sep, line))
    return "".join(out).encode("ascii")


class Reply:
    """A reply the proxy makes: code, enhanced status, text."""
    __slots__ = ("code", "status", "text")

    def __init__(self, code, status, text):
        self.code, self.status, self.text = code, status, text

    def lines(self, extra=()):
        head = [("%s %s" % (self.status, self.text)) if self.status else self.text]
        return list(extra) + head

    def wire(self, *fmt):
        text = self.text % fmt if fmt else self.text
        return reply(self.code, ("%s %s" % (self.status, text)) if self.status else text)

    def __repr__(self):
        return "Reply(%d, %r, %r)" % (self.code, self.status, self.text)


R = Reply
GREETING = R(220, None, "%s ESMTP virusgw ready")
BYE = R(221, "2.0.0", "bye")
OK = R(250, "2.0.0", "ok")
RSET_OK = R(250, "2.0.0", "reset")
NOOP_OK = R(250, "2.0.0", "ok")
HELO_OK = R(250, None, "%s hello %s")
VRFY = R(252, "2.5.0", "cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY")
START_DATA = R(354, None, "end data with <CR><LF>.<CR><LF>")

# 4xx
UNAVAILABLE = R(421, "4.3.0", "%s mail system unavailable, try again later")
TIMEOUT = R(421, "4.4.2", "%s idle timeout, closing connection")
TOO_MANY_ERRORS = R(421, "4.7.0", "%s too many errors, closing connection")
CONFIG_BROKEN = R(421, "4.3.5", "%s configuration error, try again later")
UPSTREAM_LOST = R(421, "4.4.0", "%s lost the mail system, nothing was delivered")
TOO_MANY_RCPTS = R(452, "4.5.3", "too many recipients")
QUARANTINE_FAILED = R(451, "4.3.0", "could not quarantine, try again later")
LOCAL_ERROR = R(451, "4.3.0", "local error, try again later")
SCAN_DEADLINE = R(451, "4.7.0", "scan deadline exceeded")

# 5xx
UNKNOWN = R(500, "5.5.1", "command unrecognized")
LINE_TOO_LONG = R(500, "5.5.2", "command line too long")
BAD_LINE = R(500, "5.5.2", "bare CR, LF or NUL in command line")
SYNTAX = R(501, "5.5.4", "syntax error in parameters")
BAD_HELO = R(501, "5.5.4", "syntax: HELO/EHLO domain")
BAD_PATH = R(501, "5.1.7", "bad address syntax")
BAD_RCPT_PATH = R(501, "5.1.3", "bad recipient address syntax")
NOT_IMPL = R(502, "5.5.1", "command not implemented")
BDAT_REFUSED = R(502, "5.5.1", "CHUNKING not offered; use DATA")
XCLIENT_REFUSED = R(502, "5.5.1", "not offered")
TLS_NOT_OFFERED = R(502, "5.5.1", "STARTTLS not offered")
TLS_ACTIVE = R(503, "5.5.1", "TLS already active")
TLS_IN_TRANSACTION = R(503, "5.5.1", "STARTTLS not allowed within a transaction")
TLS_READY = R(220, "2.0.0", "ready to start TLS")
TLS_UNAVAILABLE = R(454, "4.7.0", "TLS not available due to temporary reason")
NEED_HELO = R(503, "5.5.1", "send HELO or EHLO first")
NESTED_MAIL = R(503, "5.5.1", "sender already given")
NEED_MAIL = R(503, "5.5.1", "need MAIL first")
NEED_RCPT = R(503, "5.5.1", "need RCPT before DATA")
PARAM_UNKNOWN = R(555, "5.5.4", "unsupported parameter")
RELAY_DENIED = R(550, "5.7.1", "relaying denied")
LOCALPART_DENIED = R(550, "5.7.1", "local part with %, ! or quoted @ refused")
SIZE_EXCEEDED = R(552, "5.3.4", "message size exceeds fixed limit")
BARE_CRLF = R(550, "5.6.11", "bare CR or LF in message data; message refused")
DATA_LINE_TOO_LONG = R(550, "5.6.0", "line too long in message data; message refused")
