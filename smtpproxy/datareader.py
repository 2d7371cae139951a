"""The DATA reader: strict end of data, unstuffing, limits, block-wise.

RFC 5321 4.1.1.4 and 4.5.2.  Only CRLF "." CRLF ends the data; the first
line may be "." CRLF as well (the data began after the DATA command's
CRLF).  Lines are split at CRLF only, so every CRLF is a line end and the
end of data is the first occurrence of CRLF.CRLF in CRLF + data.  A bare CR
or bare LF anywhere is not guessed at (that guess is SMTP smuggling): the
whole message is refused after its end, and nothing is forwarded.

Feed it what arrives (feed(chunk) -> True when the end was seen); it writes
the unstuffed content to `out` (a file) block by block, never per line in
Python, and keeps in memory only the unfinished last line.  After the end,
.rest holds the bytes that followed (pipelined commands) and .error is
None or 'bare' | 'line' | 'size' (the first problem seen).

What this module does not do: read sockets or reply (main does both).
"""

END = b"\r\n.\r\n"


class DataReader:
    def __init__(self, out, max_size, max_line=1000):
        self.out = out
        self.max_size = max_size
        self.max_line = max_line            # octets including CRLF (RFC 5321 4.5.3.1.6)
        self.pending = b""                  # the unfinished last line
        self.line_start = True              # pending begins a line
        self.size = 0                       # unstuffed octets
        self.error = None
        self.done = False
        self.rest = b""

    def feed(self, chunk):
        """Process received bytes; True when the end of data was seen."""
        if self.done:
            self.rest += chunk
            return True
        buf = self.pending + chunk if self.pending else chunk
        if self.line_start and buf[:3] == b".\r\n":
            return self._finish(b"", buf[3:])
        i = buf.find(END)
        if i >= 0:
            return self._finish(buf[:i + 2], buf[i + 5:])
        cut = buf.rfind(b"\r\n")
        if cut >= 0:
            self._content(buf[:cut + 2])
            buf = buf[cut + 2:]
            self.line_start = True
        if len(buf) >= self.max_line:
            # An over-long line: refuse later; keep only what could begin CRLF.CRLF.
            self._fail("line")
            self.line_start = False
            buf = buf[-1:] if buf.endswith(b"\r") else b""
        self.pending = buf
        return False

    def _finish(self, content, rest):
        if content:
            self._content(content)
        self.pending = b""
        self.rest = rest
        self.done = True
        return True

    def _fail(self, why):
        if self.error is None:
            self.error = why

    def _content(self, block):
        """block: complete CRLF-terminated lines, beginning at a line start
        unless line_start is False (after a dropped over-long line)."""
        if self.error is not None:
            return
        # Bare CR or LF: whatever is left once every CRLF is removed (one
        # fast replace plus two memchr scans; ~3x faster than counting).
        rest = block.replace(b"\r\n", b"")
        if b"\r" in rest or b"\n" in rest:
            self._fail("bare")
            return
        del rest
        if len(block) > self.max_line and _has_long_line(block, self.max_line):
            self._fail("line")
            return
        if self.line_start and block[:1] == b".":
            block = block[1:]
        if b"\r\n." in block:
            block = block.replace(b"\r\n.", b"\r\n")
        self.size += len(block)
        if self.size > self.max_size:
            self._fail("size")
            return
        self.out.write(block)


def _has_long_line(block, max_line):
    """Does block (complete CRLF lines, no bare CR/LF) hold a line longer
    than max_line octets with its CRLF?  Window by window: the last LF in
    each window of max_line octets starts the next window, so a window
    without an LF is a long line.  ~n/max_line steps, not one per line."""
    p, n = 0, len(block)
    while n - p > max_line:
        i = block.rfind(b"\n", p, p + max_line)
        if i < 0:
            return True
        p = i + 1
    return False


def stuff(block, line_start=True):
    """Dot-stuff complete CRLF lines for the upstream (the inverse of
    unstuffing): a leading '.' on any line is doubled."""
    if b"\r\n." in block:
        block = block.replace(b"\r\n.", b"\r\n..")
    if line_start and block[:1] == b".":
        block = b"." + block
    return block
