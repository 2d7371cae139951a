"""Rewriting a message for strip, replace and quarantine.

rewrite(src, structure, removals, out) copies the message from src to out
byte for byte except the spans of the removed parts, each of which becomes
a text/plain part (or, for a uuencoded block inside a plain text part, a
few text lines in its place) naming what was removed and why: the part,
its type and file name, the scanner's finding, and for quarantine the
entry's id.  Clean parts stay byte-identical, so the result is valid MIME
exactly when the original was.

whole_body() replaces the entire body (a virus found only in the whole
message, a single-part message, or a structure we do not trust): the
original header block is kept minus its Content-* fields, and a text/plain
notice becomes the body.

add_headers() builds the X-Virus-Scanned / X-Virus-Status lines that are
prepended to every delivered message.

What this module does not do: decide, scan, or store.
"""

BLOCK = 1 << 16
_DROP = (b"content-type", b"content-transfer-encoding", b"content-disposition",
         b"content-id", b"content-description", b"content-length", b"mime-version")


class Removal:
    """One portion to take out: the Portion, its verdict text, and the
    quarantine id (quarantine action) if any."""

    def __init__(self, portion, finding, qid=None):
        self.portion, self.finding, self.qid = portion, finding, qid


def _safe(text, limit=200):
    text = text if isinstance(text, str) else text.decode("utf-8", "replace")
    out = "".join(c if " " <= c <= "~" else "?" for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def notice(action, hostname, removals):
    """The ASCII text that takes the place of removed content."""
    verb = {"strip": "removed", "replace": "replaced by this report",
            "quarantine": "stored in quarantine"}.get(action, "removed")
    lines = ["virusgw on %s %s the following content:" % (_safe(hostname), verb), ""]
    for r in removals:
        p = r.portion
        if p is None:
            lines.append("  the whole message body")
        else:
            desc = "  part %s (%s" % (p.index, _safe(p.content_type))
            if p.filename:
                desc += ', file "%s"' % _safe(p.filename)
            lines.append(desc + ")")
        lines.append("    finding: %s" % _safe(r.finding, 400))
        if r.qid:
            lines.append("    quarantine id: %s" % _safe(r.qid))
        lines.append("")
    if action == "quarantine":
        lines.append("Ask your mail administrator to release an entry if it is needed.")
    return ("\r\n".join(lines).rstrip("\r\n") + "\r\n").encode("ascii")


PART_HEAD = (b"Content-Type: text/plain; charset=us-ascii\r\n"
             b"Content-Transfer-Encoding: 7bit\r\n"
             b"Content-Disposition: inline\r\n\r\n")


def _target(portion):
    """The span [start, end) to replace for a portion, and whether the
    replacement is a whole part (True) or lines inside a text part (False);
    None when only the whole body can go."""
    ent = portion.entity
    if portion.span is not None and ent.cte in ("7bit", "8bit", "binary") \
            and ent.ctype.startswith("text/"):
        start, end = portion.span
        return (start, end if end is not None else ent.end, False)
    e = ent
    while e is not None and not e.in_multipart:
        e = e.parent
    if e is None:
        return None
    return (e.start, e.end, True)


def plan(removals):
    """[(start, end, is_part, [removals])] sorted, nested spans merged into
    the outer one; None when the whole body must be replaced."""
    spans = []
    for r in removals:
        t = _target(r.portion)
        if t is None:
            return None
        spans.append((t[0], t[1], t[2], [r]))
    spans.sort(key=lambda s: (s[0], -s[1]))
    merged = []
    for s in spans:
        if merged and s[0] < merged[-1][1]:           # inside (or overlapping) the previous
            last = merged[-1]
            merged[-1] = (last[0], max(last[1], s[1]), last[2] or s[2], last[3] + s[3])
        else:
            merged.append(s)
    return merged


def rewrite(src, spans, out, action, hostname):
    """Copy src to out replacing each planned span."""
    pos = 0
    for start, end, is_part, rems in spans:
        _copy(src, pos, start, out)
        text = notice(action, hostname, rems)
        if is_part:
            out.write(PART_HEAD + text[:-2])          # the CRLF before the delimiter follows
        else:
            at_part_end = rems[0].portion.span[1] is None
            out.write(text[:-2] if at_part_end else text)
        pos = end
    _copy(src, pos, None, out)


def whole_body(src, structure, out, action, hostname, removals):
    """Keep the top-level header block minus Content-* and MIME-Version;
    the body becomes the notice."""
    end = structure.root.body_start if structure.root is not None else 0
    src.seek(0)
    head = src.read(end) if end else b""
    kept = []
    drop = False
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not drop:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        drop = name in _DROP
        if not drop:
            kept.append(line)
    out.write(b"".join(l + b"\r\n" for l in kept))
    out.write(b"MIME-Version: 1.0\r\n" + PART_HEAD)
    out.write(notice(action, hostname, removals))


def _copy(src, start, end, out):
    src.seek(start)
    left = None if end is None else end - start
    while left is None or left > 0:
        block = src.read(BLOCK if left is None else min(BLOCK, left))
        if not block:
            break
        out.write(block)
        if left is not None:
            left -= len(block)


def add_headers(version, hostname, status):
    """The lines prepended to a delivered message (bytes, CRLF)."""
    scanned = "virusgw on %s" % _safe(hostname, 100)
    if version:
        scanned += " (%s)" % _safe(version, 100)
    return ("X-Virus-Scanned: %s\r\nX-Virus-Status: %s\r\n"
            % (scanned, _safe(status, 400))).encode("ascii")
