"""Streaming MIME / uuencode splitter: the scan units of one message.

split(f, spool, ...) reads the unstuffed message (a spool file, CRLF line
ends guaranteed by the DATA reader) once, front to back, in large blocks,
and writes every encoded portion to its own spool file through an
incremental decoder:
  - every MIME leaf with Content-Transfer-Encoding base64, quoted-printable
    or x-uuencode, decoded;
  - every other non-text leaf (an attachment sent 7bit/8bit/binary), as is;
  - every uuencoded block ("begin NNN name" ... "end", or begin-base64)
    inside a text leaf or a non-MIME body;
  - nested message/rfc822 parsed recursively (or, when itself encoded,
    decoded into one portion that clamd parses as mail).
Memory stays flat: only a header block and one buffer are ever held.

Where two reasonable MIME readers could disagree, the structure is marked
malformed (Structure.malformed lists why) instead of guessing: duplicate
Content-Type / Content-Transfer-Encoding headers, duplicate or RFC 2231
boundary parameters, escapes or comments in parameters, a delimiter line
with junk after the boundary, nested parts reusing an outer boundary, a
header line that is neither a field nor a continuation (a missing header/
body separator), whitespace-only lines in a header block, unknown
transfer encodings, encoded multiparts, base64 with junk or padding in
mid-stream, message/partial, and depth or part-count limits.  A missing
final boundary is not ambiguous: end of data closes the part, and it is
scanned like any other.

Offsets (Entity.start/.end, Portion.span) are byte offsets in the message
so that rewrite.py can replace a part and copy every other byte as is.

What this module does not do: scan, decide, or hold a body in memory (the
email package is not used: it silently repairs several of the cases above).
"""

import binascii
import re

BLOCK = 1 << 18
MAX_HEADER_BLOCK = 1 << 20
MAX_HEADER_LINE = 1 << 16
IDENTITY = ("7bit", "8bit", "binary")
MESSAGES = ("message/rfc822", "message/global")     # parsed as nested messages
ENCODINGS = IDENTITY + ("base64", "quoted-printable", "x-uuencode", "x-uue", "uuencode", "uue")
_B64_DELETE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_WS = b" \t\r\n"
# Patterns, not compiled objects: re compiles (and caches) each on first
# use, and most messages need none of them (compiling all at import cost
# every message ~0.5 ms, issue 7).
_BCHARS = r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$"
_UU_BEGIN = rb"^begin(-base64)? +([0-7]{1,4}) +(.*?)[ \t]*$"
_YENC_BEGIN = rb"^=ybegin .*?(?:name=(.*?))?[ \t]*$"
_FIELD_NAME = rb"^[!-9;-~]+$"
_MEDIA_TYPE = r"^([!#$%&'*+.^_`|~0-9a-z-]+)/([!#$%&'*+.^_`|~0-9a-z-]+)$"
_PARAM = r'\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;"]*)\s*(;|$)'
_QUOTED_PAIR = r"\\(.)"


def precompile():
    """Compile every pattern above into re's cache, with the flags its use
    passes (same cache key), plus the one replacement template: for the
    warm forking mode's parent (scanlib.prefork), whose children inherit
    the cache.  Never called per message."""
    for pattern, flags in ((_BCHARS, 0), (_UU_BEGIN, 0), (_YENC_BEGIN, 0), (_FIELD_NAME, 0),
                           (_MEDIA_TYPE, 0), (_PARAM, re.S), (_QUOTED_PAIR, 0)):
        re.compile(pattern, flags)
    re.sub(_QUOTED_PAIR, r"\1", "\\x")


class Portion:
    """One scan unit written to a spool file (path; the file is closed)."""

    def __init__(self, index, path, content_type, filename, encoding, entity, span=None):
        self.index = index              # '1.2', '1.2/uu1'
        self.path = path
        self.content_type = content_type
        self.filename = filename
        self.encoding = encoding        # base64 | quoted-printable | uuencode | identity
        self.entity = entity            # the Entity it came from
        self.span = span                # (start, end) in the message for in-place uu blocks
        self.size = 0

    @property
    def encoded(self):
        return self.encoding != "identity"

    def __repr__(self):
        return "Portion(%r, %r, %r, %r, %d)" % (self.index, self.content_type, self.filename,
                                               self.encoding, self.size)


class Entity:
    """A MIME entity: headers [start, body_start), body [body_start, end)."""

    def __init__(self, index, start, parent):
        self.index = index
        self.start = start
        self.body_start = start
        self.end = start
        self.parent = parent
        self.children = []
        self.ctype = "text/plain"
        self.cte = "7bit"
        self.filename = ""
        self.in_multipart = parent is not None and parent.ctype.startswith("multipart/")

    def __repr__(self):
        return "Entity(%r, %r, %d-%d-%d)" % (self.index, self.ctype, self.start,
                                             self.body_start, self.end)


class Structure:
    def __init__(self):
        self.root = None
        self.portions = []
        self.malformed = []
        self.entities = 0
        self.subject = ""           # of the top-level header block, for quarantine metadata
        self.message_id = ""

    @property
    def has_encoded(self):
        return any(p.encoded for p in self.portions)

    def bad(self, why):
        if why not in self.malformed and len(self.malformed) < 20:
            self.malformed.append(why)


class _Stop(Exception):
    """A limit was hit: stop parsing (the whole message is still scanned)."""


class _Cursor:
    """Sliding-window reader over the message with absolute offsets."""

    def __init__(self, f):
        self.f = f
        self.buf = b""
        self.pos = 0
        self.base = 0
        self.eof = False

    def offset(self):
        return self.base + self.pos

    def fill(self):
        if self.eof:
            return False
        data = self.f.read(BLOCK)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.base += self.pos
        self.pos = 0
        return True

    def readline(self, limit):
        """The next line with its CRLF (b'' at EOF; the last line may lack
        CRLF; a line over limit is returned cut at limit)."""
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0 and i + 1 - self.pos <= limit:
                line = self.buf[self.pos:i + 1]
                self.pos = i + 1
                return line
            if len(self.buf) - self.pos >= limit:
                line = self.buf[self.pos:self.pos + limit]
                self.pos += limit
                return line
            if not self.fill():
                line = self.buf[self.pos:]
                self.pos = len(self.buf)
                return line

    def peek_line(self, limit=1000):
        """The next line (without consuming), for delimiter checks."""
        while True:
            i = self.buf.find(b"\n", self.pos)
            if i >= 0 or len(self.buf) - self.pos > limit or not self.fill():
                end = i + 1 if i >= 0 else len(self.buf)
                return self.buf[self.pos:min(end, self.pos + limit)]


def split(f, spool, max_depth=20, max_parts=1000):
    """Parse the message in file f (positioned anywhere; read from 0).
    Returns a Structure.  Portion files are created by spool.create() and
    closed; their paths are in Structure.portions."""
    f.seek(0)
    st = Structure()
    p = _Parser(_Cursor(f), spool, st, max_depth, max_parts)
    try:
        p.entity("1", 0, [], None, "text/plain")
    except _Stop:
        pass
    finally:
        p.close_sink()
    return st


class _Parser:
    def __init__(self, cur, spool, st, max_depth, max_parts):
        self.cur = cur
        self.spool = spool
        self.st = st
        self.max_depth = max_depth
        self.max_parts = max_parts
        self.sink = None
        self.remap = None           # set for the parser of a decoded message/rfc822

    def close_sink(self):
        if self.sink is not None:
            try:
                self.sink.close()
            except Exception:
                pass
            self.sink = None

    # -- delimiters ----------------------------------------------------------
    def classify(self, line, delims):
        """line (bytes, with or without CRLF) -> (boundary, closing) when it
        is a delimiter of an active boundary, else None.  Junk after an
        active boundary is an ambiguity (prefix-matching readers exist)."""
        if not line.startswith(b"--") or not delims:
            return None
        text = line.rstrip(b"\r\n")
        hits = []
        for b in delims:
            d = b"--" + b
            if not text.startswith(d):
                continue
            tail = text[len(d):]
            closing = tail.startswith(b"--")
            if closing:
                tail = tail[2:]
            if tail.strip(b" \t"):
                self.st.bad("junk after a boundary delimiter")
                continue
            hits.append((b, closing))
        if len(hits) > 1:
            self.st.bad("a line matching two boundaries")
        return hits[0] if hits else None

    # -- one entity ----------------------------------------------------------
    def entity(self, index, depth, delims, parent, default_ctype):
        """Parse one entity from the cursor; returns the delimiter that ended
        it ((boundary, closing, line_start)) or None at end of data."""
        st = self.st
        st.entities += 1
        if st.entities > self.max_parts:
            st.bad("more than %d MIME parts" % self.max_parts)
            raise _Stop()
        if depth > self.max_depth:
            st.bad("MIME nesting deeper than %d" % self.max_depth)
            raise _Stop()
        cur = self.cur
        ent = Entity(index, cur.offset(), parent)
        if parent is None:
            st.root = ent
        else:
            parent.children.append(ent)
        headers, term = self.headers(delims)
        ent.body_start = cur.offset()
        self.interpret(ent, headers, default_ctype)
        if term is not None:                      # a delimiter inside the header block
            ent.end = term[2]
            return term
        ct = ent.ctype
        if ct.startswith("multipart/"):
            return self.multipart(ent, depth, delims)
        if ct in MESSAGES and ent.cte in IDENTITY:
            term = self.entity(index + ".1", depth + 1, delims, ent, "text/plain")
            ent.end = term[2] if term else cur.offset()
            return term
        if ct == "message/partial":
            st.bad("message/partial")
        return self.leaf(ent, delims, depth)

    def headers(self, delims):
        """[(name_lower, value, raw)], and a delimiter if one interrupts."""
        cur, st = self.cur, self.st
        fields = []
        total = 0
        while True:
            start = cur.offset()
            line = cur.readline(MAX_HEADER_LINE)
            if not line:
                return fields, None                  # end of data: no body
            total += len(line)
            if total > MAX_HEADER_BLOCK:
                st.bad("header block too large")
                raise _Stop()
            if line in (b"\r\n", b"\n"):
                return fields, None
            term = self.classify(line, delims)
            if term is not None:
                st.bad("header/body separator missing before a boundary")
                return fields, (term[0], term[1], start)
            if line[:1] in (b" ", b"\t"):
                if not line.strip():
                    st.bad("whitespace-only line in a header block")
                if not fields:
                    st.bad("continuation line before any header field")
                    continue
                name, value, raw = fields[-1]
                fields[-1] = (name, value + line.rstrip(b"\r\n"), raw + line)
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or not re.match(_FIELD_NAME, name):
                st.bad("header line that is not a field (missing separator?)")
                continue
            fields.append((name.decode("latin-1").lower(), value.rstrip(b"\r\n"), line))

    def interpret(self, ent, fields, default_ctype):
        st = self.st
        seen = {}
        for name, value, _ in fields:
            seen.setdefault(name, []).append(value)
        for name in ("content-type", "content-transfer-encoding", "content-disposition"):
            if len(seen.get(name, ())) > 1:
                st.bad("duplicate %s" % name)
        ctype, params = default_ctype, {}
        if "content-type" in seen:
            parsed = self.parse_ct(seen["content-type"][0])
            if parsed is None:
                st.bad("unparsable Content-Type")
            else:
                ctype, params = parsed
        ent.ctype = ctype
        ent.params = params
        if ent.parent is None:
            for key, attr in (("subject", "subject"), ("message-id", "message_id")):
                if key in seen:
                    setattr(st, attr, seen[key][0].decode("utf-8", "replace").strip()[:998])
        cte = "7bit"
        if "content-transfer-encoding" in seen:
            cte = seen["content-transfer-encoding"][0].decode("latin-1").strip().lower()
            if cte not in ENCODINGS:
                st.bad("unknown Content-Transfer-Encoding")
                cte = "7bit"
        ent.cte = cte
        fname = params.get("name", "")
        if "content-disposition" in seen:
            parsed = self.parse_ct(b"x/" + seen["content-disposition"][0].strip(), strict=False)
            if parsed and parsed[1].get("filename"):
                fname = parsed[1]["filename"]
            elif parsed and parsed[1].get("filename*"):
                fname = parsed[1]["filename*"]
        ent.filename = fname
        if ctype.startswith("multipart/"):
            if cte not in IDENTITY:
                st.bad("encoded multipart")
            b = params.get("boundary")
            if not b or not re.match(_BCHARS, b):
                st.bad("multipart without a usable boundary")
                ent.ctype = "application/octet-stream"

    def parse_ct(self, raw, strict=True):
        """b'type/sub; a=b; c="d"' -> ('type/sub', {a: b}) or None; any
        form readers disagree on marks the structure malformed (strict:
        Content-Type; Content-Disposition only names a file)."""
        st = self.st
        text = raw.decode("latin-1")
        head, sep, rest = text.partition(";")
        mtype = head.strip().lower()
        if strict and "(" in text and '"' not in text:
            st.bad("comment in a MIME header")
        m = re.match(_MEDIA_TYPE, mtype)
        if not m:
            return None
        params = {}
        pos = 0
        while rest[pos:].strip():
            mm = re.match(_PARAM, rest[pos:], re.S)
            if not mm:
                st.bad("unparsable MIME parameter")
                break
            pos += mm.end()
            key, val = mm.group(1).lower(), mm.group(2)
            if val.startswith('"'):
                val = val[1:-1]
                if "\\" in val and key == "boundary":
                    st.bad("escaped character in a quoted boundary")
                    val = re.sub(_QUOTED_PAIR, r"\1", val)
            if "*" in key and key.split("*", 1)[0] in ("boundary", "charset"):
                st.bad("RFC 2231 form of %s" % key.split("*", 1)[0])
            if key in params:
                if strict or key.startswith("filename"):
                    st.bad("duplicate %s parameter" % key)
                continue
            params[key] = val
        return mtype, params

    def multipart(self, ent, depth, delims):
        st, cur = self.st, self.cur
        b = ent.params["boundary"].encode("latin-1")
        if b in delims:
            st.bad("nested multipart reuses an outer boundary")
        inner = [b] + [d for d in delims if d != b]
        term = self.skip(inner)                      # the preamble
        n = 0
        while term is not None and term[0] == b and not term[1]:
            n += 1
            term = self.entity("%s.%d" % (ent.index, n), depth + 1, inner, ent,
                               "message/rfc822" if ent.ctype == "multipart/digest"
                               else "text/plain")
        if n == 0:
            # RFC 2046 5.1.1: one body part at least.  No delimiter of the
            # declared boundary at all (e.g. delimiters that differ only in
            # case) is a structure other readers see differently.
            st.bad("multipart with no body part (its boundary never occurs)")
        if term is not None and term[0] == b:        # closing delimiter: the epilogue
            ent.end = cur.offset()
            return self.skip(delims)
        if term is None:
            ent.end = cur.offset()                   # end of data closed it
            return None
        ent.end = term[2]                            # an outer delimiter closed it
        return term

    def skip(self, delims):
        return self.body(delims, None)

    def body(self, delims, sink):
        """Feed body bytes to sink (or drop them) up to the next delimiter
        line of any active boundary; returns (boundary, closing, offset of
        the CRLF before the delimiter line) or None at end of data."""
        cur = self.cur
        # A delimiter right at the body start (empty body): no CRLF before it.
        first = cur.peek_line()
        term = self.classify(first, delims) if first.startswith(b"--") else None
        if term is not None:
            at = cur.offset()
            cur.pos += len(first)
            return (term[0], term[1], at)
        while True:
            buf, pos = cur.buf, cur.pos
            i = buf.find(b"\r\n--", pos) if delims else -1
            while i >= 0:
                j = buf.find(b"\n", i + 2)
                if j < 0:
                    if len(buf) - i > 2000:          # too long for a delimiter line
                        i = buf.find(b"\r\n--", i + 2)
                        continue
                    break                            # need more data to decide
                term = self.classify(buf[i + 2:j + 1], delims)
                if term is not None:
                    if sink is not None and i > pos:
                        sink.write(buf[pos:i])
                    cur.pos = j + 1
                    return (term[0], term[1], cur.base + i)
                i = buf.find(b"\r\n--", i + 2)
            # Emit all but a tail that could begin a delimiter line.
            keep = buf.rfind(b"\r\n", pos)
            if i >= 0:
                keep = i
            if not delims:
                keep = len(buf)
            elif keep < 0:
                keep = len(buf) - 1 if buf.endswith(b"\r") else len(buf)
            if sink is not None and keep > pos:
                sink.write(buf[pos:keep])
            cur.pos = keep
            if not cur.fill():
                rest = cur.buf[cur.pos:]
                if rest.startswith(b"\r\n--"):          # a last delimiter without CRLF
                    term = self.classify(rest[2:], delims)
                    if term is not None:
                        at = cur.offset()
                        cur.pos = len(cur.buf)
                        return (term[0], term[1], at)
                if sink is not None and rest:
                    sink.write(rest)
                cur.pos = len(cur.buf)
                return None

    def leaf(self, ent, delims, depth=0):
        st = self.st
        ct, cte = ent.ctype, ent.cte
        text = ct.startswith("text/") or ct in MESSAGES
        sink = None
        if cte == "base64":
            sink = _Base64(self, ent, st)
        elif cte == "quoted-printable":
            sink = _QP(self, ent)
        elif cte in ("x-uuencode", "x-uue", "uuencode", "uue"):
            sink = _UUScanner(self, ent, whole=True)
        elif text:
            sink = _UUScanner(self, ent)             # in-place uuencoded blocks
        else:
            sink = _Raw(self, ent)
        self.sink = sink
        term = self.body(delims, sink)
        ent.end = term[2] if term else self.cur.offset()
        self.sink = None
        sink.close()
        if ct in MESSAGES and cte in ("base64", "quoted-printable"):
            self.encoded_message(ent, sink.p.path, depth)
        return term

    def encoded_message(self, ent, path, depth):
        """RFC 2046 5.2.1 allows only 7bit, 8bit or binary for
        message/rfc822: an encoded one is malformed, and its decoded text is
        split like any message (its portions stand for the whole encoded
        part when it comes to rewriting)."""
        if ent.ctype == "message/rfc822":       # message/global may be encoded (RFC 6532 3.5)
            self.st.bad("encoded message/rfc822")
        with open(path, "rb") as f:
            sub = _Parser(_Cursor(f), self.spool, self.st, self.max_depth, self.max_parts)
            sub.remap = ent
            try:
                sub.entity(ent.index + ".1", depth + 1, [], ent, "text/plain")
            finally:
                sub.close_sink()

    def new_portion(self, ent, encoding, suffix="", filename=None, span=None):
        if len(self.st.portions) >= self.max_parts:
            self.st.bad("more than %d portions" % self.max_parts)
            raise _Stop()
        f = self.spool.create(prefix="vgw-part-")
        owner = ent
        if self.remap is not None:
            # Inside a decoded message/rfc822: offsets are not the message's;
            # rewriting acts on the encoded part that holds it.
            owner, span = self.remap, None
        p = Portion(ent.index + suffix, _path_of(f, self.spool), ent.ctype,
                    ent.filename if filename is None else filename, encoding, owner, span)
        self.st.portions.append(p)
        return p, f


def _path_of(f, spool):
    """The path of a file spool.create() just made (os.fdopen files are
    named by their fd number)."""
    return f.name if isinstance(f.name, str) else spool.paths[-1]


class _Lines:
    """Line-aligns a block stream: handle(data) gets whole lines (CRLF),
    tracking the offset in the (decoded) stream."""

    def __init__(self):
        self.carry = b""
        self.offset = 0

    def write(self, data):
        data = self.carry + data if self.carry else data
        cut = data.rfind(b"\n") + 1
        self.carry = data[cut:]
        if cut:
            self.handle(data[:cut], self.offset)
            self.offset += cut

    def flush(self):
        if self.carry:
            c, self.carry = self.carry, b""
            self.handle(c, self.offset)
            self.offset += len(c)


class _Raw:
    """A non-text leaf sent as is: one portion, and any uuencoded or yEnc
    block inside it extracted too (a reader may show those)."""

    def __init__(self, parser, ent):
        self.p, self.f = parser.new_portion(ent, "identity")
        self.uu = _UUScanner(parser, ent)

    def write(self, data):
        self.f.write(data)
        self.p.size += len(data)
        self.uu.write(data)

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None
            self.uu.close()


class _Base64:
    def __init__(self, parser, ent, st):
        self.parser, self.ent, self.st = parser, ent, st
        self.p, self.f = parser.new_portion(ent, "base64")
        self.carry = b""
        self.padded = False
        self.text = ent.ctype.startswith("text/")
        self.uu = _UUScanner(parser, ent, decoded_from=self) if self.text else None

    def write(self, data):
        data = data.translate(None, _WS)
        data = self.carry + data if self.carry else data
        n = len(data) // 4 * 4
        chunk, self.carry = data[:n], data[n:]
        if not chunk:
            return
        if not self.padded:
            # Fast path: one strict C pass checks the alphabet and that
            # padding comes only at the very end.
            try:
                out = binascii.a2b_base64(chunk, strict_mode=True)
            except (binascii.Error, TypeError):
                out = None
            if out is not None:
                if chunk.endswith(b"="):
                    self.padded = True
                self._out(out)
                return
        self._slow(chunk)

    def _slow(self, chunk):
        """Junk, or padding followed by more data: readers disagree (some
        skip junk, some stop at the first '='): malformed, and the lenient
        reading is what gets scanned."""
        if chunk.translate(None, _B64_DELETE):
            self.st.bad("junk in base64")
            chunk = bytes(c for c in chunk if c in _B64_DELETE)
        eq = chunk.find(b"=")
        if (self.padded and chunk.strip(b"=")) or (eq >= 0 and chunk[eq:].strip(b"=")):
            self.st.bad("base64 padding in mid-stream")
        if eq >= 0:
            self.padded = True
        try:
            out = binascii.a2b_base64(chunk)
        except binascii.Error:
            self.st.bad("undecodable base64")
            out = b""
        self._out(out)

    def _out(self, out):
        if out:
            self.f.write(out)
            self.p.size += len(out)
            if self.uu is not None:
                self.uu.write(out)

    def close(self):
        if self.carry.strip(b"="):
            self.st.bad("truncated base64")
            try:
                self._out(binascii.a2b_base64(self.carry + b"=" * (-len(self.carry) % 4)))
            except binascii.Error:
                pass
        if self.uu is not None:
            self.uu.close()
        self.f.close()


class _QP(_Lines):
    def __init__(self, parser, ent):
        _Lines.__init__(self)
        self.p, self.f = parser.new_portion(ent, "quoted-printable")
        self.uu = _UUScanner(parser, ent, decoded_from=self) \
            if ent.ctype.startswith("text/") else None

    def handle(self, lines, offset):
        out = binascii.a2b_qp(lines)
        if out:
            self.f.write(out)
            self.p.size += len(out)
            if self.uu is not None:
                self.uu.write(out)

    def close(self):
        self.flush()
        if self.uu is not None:
            self.uu.close()
        self.f.close()


class _UUScanner(_Lines):
    """Finds uuencoded blocks in text (LF or CRLF lines) and decodes each
    into its own portion.  whole=True: the entity is x-uuencode, so its
    body is one uuencoded file (a begin line is still looked for, and lines
    before it are tolerated)."""

    def __init__(self, parser, ent, whole=False, decoded_from=None):
        _Lines.__init__(self)
        self.parser, self.ent = parser, ent
        self.whole = whole
        # offsets are message offsets (not inside a decoded part or message)
        self.in_place = decoded_from is None and parser.remap is None
        self.cur = None                           # (portion, file, mode) while in a block
        self.count = 0
        self.base = ent.body_start

    def handle(self, lines, offset):
        if self.cur is None and b"begin" not in lines:
            return
        pos = 0
        n = len(lines)
        while pos < n:
            if self.cur is None:
                i = lines.find(b"begin", pos)
                if i < 0:
                    return
                ls = lines.rfind(b"\n", 0, i) + 1
                if ls != i and not (i - ls == 2 and lines[ls:i] == b"=y"):
                    pos = lines.find(b"\n", i) + 1 or n  # not at a line start
                    continue
                pos = ls
            e = lines.find(b"\n", pos)
            e = n if e < 0 else e + 1
            line = lines[pos:e]
            self.line(line.rstrip(b"\r\n"), offset + pos, offset + e)
            pos = e

    def line(self, line, start, end):
        if self.cur is None:
            # (the startswith tests are what the patterns' anchors require)
            m = re.match(_UU_BEGIN, line) if line.startswith(b"begin") else None
            y = None if m or not line.startswith(b"=ybegin ") else re.match(_YENC_BEGIN, line)
            if m or y:
                self.count += 1
                if m:
                    name, mode = m.group(3), "b64" if m.group(1) else "uu"
                else:
                    name, mode = y.group(1) or b"", "yenc"
                p, f = self.parser.new_portion(
                    self.ent, "uuencode" if mode != "yenc" else "yenc",
                    "/%s%d" % ("uu" if mode != "yenc" else "yenc", self.count),
                    filename=name.decode("latin-1"))
                p.span = (self.base + start, None) if self.in_place else None
                self.cur = [p, f, mode, b""]
            return
        p, f, mode, carry = self.cur
        b64 = mode == "b64"
        if mode == "yenc":
            if line.startswith(b"=yend"):
                self._end(end)
            elif not line.startswith(b"=ypart"):
                out = _yenc_line(line)
                f.write(out)
                p.size += len(out)
            return
        if (line.strip() == b"end" and not b64) or (b64 and line.strip() == b"===="):
            self._end(end)
            return
        if b64:
            data = line.strip()
            try:
                out = binascii.a2b_base64(data) if data else b""
            except binascii.Error:
                self.parser.st.bad("undecodable begin-base64 line")
                out = b""
        else:
            out = _uu_line(line)
            if out is None:
                self.parser.st.bad("undecodable uuencoded line")
                out = b""
        if out:
            f.write(out)
            p.size += len(out)

    def _end(self, end):
        p, f = self.cur[0], self.cur[1]
        if p.span is not None:
            p.span = (p.span[0], self.base + end if end is not None else None)
        f.close()
        self.cur = None

    def close(self):
        self.flush()
        if self.cur is not None:                      # end of part closes the block
            self._end(self.offset)
            if self.cur is None and self.in_place:
                p = self.parser.st.portions[-1]
                p.span = (p.span[0], None)            # unterminated: replace to part end


_YENC = bytes((i - 42) & 0xff for i in range(256))


def _yenc_line(line):
    """One yEnc data line: every byte minus 42; '=' escapes the next byte
    (minus 64 more)."""
    parts = line.split(b"=")
    out = [parts[0].translate(_YENC)]
    for part in parts[1:]:
        if part:
            out.append(bytes(((part[0] - 106) & 0xff,)) + part[1:].translate(_YENC))
    return b"".join(out)


def _uu_line(line):
    if not line:
        return b""
    n = (line[0] - 32) & 63
    if n == 0:
        return b""
    body = line[:1 + (n + 2) // 3 * 4]
    try:
        return binascii.a2b_uu(body)[:n]
    except binascii.Error:
        try:
            return binascii.a2b_uu(body.replace(b" ", b"`"))[:n]
        except binascii.Error:
            return None
