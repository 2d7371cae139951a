"""FTP replies: building the proxy's own, parsing the server's.  Pure.

reply(code, *lines) builds one reply; a multi-line reply is 'NNN-text'
lines ending in 'NNN text' with the same code (RFC 959 4.2), which is what
every client's reader expects.  Text is made safe first: CR, LF and NUL are
replaced (a file name or a scanner's finding can never end a reply early or
forge another one).

ReplyParser turns the upstream server's byte stream into whole replies
(code, raw lines), following 'NNN-' continuations to the matching 'NNN '
line, with bounded line length and line count: a server that breaks these
rules is a protocol error (the proxy then says 421 and ends).
"""

MAX_REPLY_LINE = 8192
MAX_REPLY_LINES = 2000


def _safe(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return text.replace("\r", " ").replace("\n", " ").replace("\0", " ")


def reply(code, *lines):
    """Bytes of one reply with code and one or more text lines."""
    lines = [_safe(t) for t in lines] or [""]
    out = []
    for t in lines[:-1]:
        out.append("%d-%s\r\n" % (code, t))
    out.append("%d %s\r\n" % (code, lines[-1]))
    return "".join(out).encode("utf-8", "surrogateescape")


def with_notes(code, notes, final):
    """A reply whose continuation lines carry notes (the scanner's finding,
    a quarantine id) before the final line."""
    return reply(code, *(list(notes) + [final]))


class ReplyError(Exception):
    """The upstream server broke the reply syntax."""


class Reply:
    __slots__ = ("code", "lines")

    def __init__(self, code, lines):
        self.code = code          # int
        self.lines = lines        # raw lines (bytes, without CRLF)

    @property
    def text(self):
        """The text of the last line (after the code)."""
        return self.lines[-1][4:].decode("utf-8", "replace")

    @property
    def all_text(self):
        return "\n".join(line[4:].decode("utf-8", "replace") if len(line) >= 4 else ""
                         for line in self.lines)

    def raw(self):
        """The reply as it came, lines rejoined with CRLF."""
        return b"".join(line + b"\r\n" for line in self.lines)

    def body_lines(self):
        """Text of every line without its 'NNN-'/'NNN ' prefix (for
        re-emitting the server's text under another reply)."""
        out = []
        for i, line in enumerate(self.lines):
            if line[:3] == (b"%d" % self.code) and line[3:4] in (b"-", b" "):
                out.append(line[4:])
            else:
                out.append(line)
        return out

    def __repr__(self):
        return "Reply(%d, %r)" % (self.code, self.lines)


class ReplyParser:
    def __init__(self):
        self.buf = b""
        self.pending = []        # lines of a multi-line reply so far
        self.code = None

    def feed(self, data):
        """Add bytes; returns the list of complete Replies."""
        self.buf += data
        out = []
        while True:
            i = self.buf.find(b"\n")
            if i < 0:
                if len(self.buf) > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return out
            line, self.buf = self.buf[:i], self.buf[i + 1:]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            r = self._line(line)
            if r is not None:
                out.append(r)

    def _line(self, line):
        if self.code is None:
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ReplyError("malformed reply line %r" % line[:80])
            code = int(line[:3])
            if not 100 <= code <= 599:
                raise ReplyError("reply code out of range %r" % line[:80])
            if line[3:4] == b"-":
                self.code = code
                self.pending = [line]
                return None
            return Reply(code, [line])
        self.pending.append(line)
        if len(self.pending) > MAX_REPLY_LINES:
            raise ReplyError("multi-line reply too long")
        if line[:3] == (b"%d" % self.code) and line[3:4] in (b" ", b""):
            r = Reply(self.code, self.pending)
            self.code, self.pending = None, []
            return r
        return None
