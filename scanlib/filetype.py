"""File-type rules for skipping the scan by extension.

The patent lets files of types unlikely to carry viruses pass unscanned,
chosen by name ([ftp] skip_extensions, e.g. '.txt').  A name is only a
claim, and so is the head of a file: an archive can sit behind a page of
text (self-extracting archives and zips are read from their end), and
APPE can add one to a text file.  The rule is therefore about the WHOLE
file: it is skipped only when its name ends with a skipped extension, its
first bytes are none of the risky kinds (an executable, a script with a
#! line, an archive or compressed file, an OLE2 document, a PDF, an RTF)
and every byte of it is plain text (is_text: no NUL, no control bytes
other than TAB, LF, VT, FF, CR and ESC, and either valid UTF-8 or
printable Latin-1/Windows-1252).  Binary content is always scanned, so
an image extension in skip_extensions skips nothing: a GIF or JPEG can
carry an archive or a script as well as text can not.

Text-encoded payloads (base64, uuencode inside a .txt) are not looked
for: a file like that is plain text, and the admin who lists .txt has
chosen to let it pass.  Callers give may_skip_file() the spooled file
(read through once, in blocks; nothing is kept).

What this module does not do: decide anything for mail (SMTP scans every
portion), or trust a content type sent by the peer.
"""

HEAD_SIZE = 512

# (kind, offset, magic)
MAGIC = (
    ("executable/pe", 0, b"MZ"),
    ("executable/elf", 0, b"\x7fELF"),
    ("executable/mach-o", 0, b"\xfe\xed\xfa\xce"),
    ("executable/mach-o", 0, b"\xfe\xed\xfa\xcf"),
    ("executable/mach-o", 0, b"\xce\xfa\xed\xfe"),
    ("executable/mach-o", 0, b"\xcf\xfa\xed\xfe"),
    ("executable/mach-o-fat-or-class", 0, b"\xca\xfe\xba\xbe"),
    ("executable/script", 0, b"#!"),
    ("executable/dex", 0, b"dex\n"),
    ("executable/wasm", 0, b"\x00asm"),
    ("archive/zip", 0, b"PK\x03\x04"),
    ("archive/zip", 0, b"PK\x05\x06"),
    ("archive/zip", 0, b"PK\x07\x08"),
    ("archive/rar", 0, b"Rar!\x1a\x07"),
    ("archive/7z", 0, b"7z\xbc\xaf\x27\x1c"),
    ("archive/gzip", 0, b"\x1f\x8b"),
    ("archive/bzip2", 0, b"BZh"),
    ("archive/xz", 0, b"\xfd7zXZ\x00"),
    ("archive/zstd", 0, b"\x28\xb5\x2f\xfd"),
    ("archive/lzip", 0, b"LZIP"),
    ("archive/compress", 0, b"\x1f\x9d"),
    ("archive/cab", 0, b"MSCF"),
    ("archive/arj", 0, b"\x60\xea"),
    ("archive/lha", 2, b"-lh"),
    ("archive/tar", 257, b"ustar"),
    ("archive/cpio", 0, b"070701"),
    ("archive/cpio", 0, b"070707"),
    ("archive/ar", 0, b"!<arch>\n"),
    ("archive/iso9660", 32769, b"CD001"),      # beyond HEAD_SIZE: caught by extension rules only
    ("document/ole2", 0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),
    ("document/pdf", 0, b"%PDF"),
    ("document/rtf", 0, b"{\\rtf"),
)


def sniff(head):
    """The risky kind the first bytes show ('executable/pe', 'archive/zip',
    ...), or None when they show none of them."""
    head = bytes(head[:HEAD_SIZE])
    for kind, off, magic in MAGIC:
        if head[off:off + len(magic)] == magic:
            return kind
    return None


def extension_skips(name, skip_extensions):
    """True when name (str or bytes) ends with one of skip_extensions
    (case-insensitive; entries with or without the leading dot)."""
    if not skip_extensions:
        return False
    if isinstance(name, bytes):
        name = name.decode("utf-8", "surrogateescape")
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower().rstrip(". ")
    for ext in skip_extensions:
        e = ext.strip().lower()
        if not e:
            continue
        if not e.startswith("."):
            e = "." + e
        if base.endswith(e) and len(base) > len(e):
            return True
    return False


def may_skip(name, head, skip_extensions):
    """Skip the scan only when the name says a harmless type AND the content
    (here: all of it is in head) is plain text and none of the risky kinds."""
    return (extension_skips(name, skip_extensions) and sniff(head) is None
            and is_text(head))


# Bytes below 0x80 that plain text may hold: printable ASCII, TAB, LF, VT,
# FF, CR, ESC (ANSI colour in logs).
ASCII_TEXT = bytes(range(0x20, 0x7f)) + b"\t\n\x0b\x0c\r\x1b"
HIGH = bytes(range(0x80, 0x100))
# High bytes printable in Latin-1 or Windows-1252 (not 0x81 0x8d 0x8f 0x90
# 0x9d, which Windows-1252 leaves undefined).
LATIN_TEXT = bytes(b for b in range(0x80, 0x100) if b not in (0x81, 0x8d, 0x8f, 0x90, 0x9d))
BLOCK = 1 << 20


class TextCheck:
    """Incremental is_text: feed() blocks, then .result."""

    def __init__(self):
        import codecs
        self.low_ok = True           # no byte below 0x80 outside ASCII_TEXT
        self.latin_ok = True         # every high byte in LATIN_TEXT
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.utf8_ok = True

    def feed(self, data):
        data = bytes(data)
        if not self.low_ok:
            return
        rest = data.translate(None, ASCII_TEXT)
        if rest.translate(None, HIGH):
            self.low_ok = False
            return
        if not rest:
            return
        if self.latin_ok and rest.translate(None, LATIN_TEXT):
            self.latin_ok = False
        if self.utf8_ok:
            try:
                self.utf8.decode(data)
            except UnicodeDecodeError:
                self.utf8_ok = False

    @property
    def result(self):
        if self.utf8_ok:
            try:
                self.utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                self.utf8_ok = False
        return self.low_ok and (self.utf8_ok or self.latin_ok)


def is_text(data):
    """True when data (bytes) is plain text as the module docstring says."""
    t = TextCheck()
    t.feed(data)
    return t.result


def file_is_text(f, offset=0):
    """is_text over a real file (object with fileno(), or a descriptor),
    read in blocks with pread from offset; the file position is unchanged."""
    import os
    fd = f if isinstance(f, int) else f.fileno()
    t = TextCheck()
    pos = offset
    while True:
        block = os.pread(fd, BLOCK, pos)
        if not block:
            break
        t.feed(block)
        if not t.low_ok:
            return False
        pos += len(block)
    return t.result


def may_skip_file(name, f, skip_extensions):
    """may_skip() for a whole spooled file: name skipped, head none of the
    risky kinds, and the whole file plain text."""
    import os
    if not extension_skips(name, skip_extensions):
        return False
    fd = f if isinstance(f, int) else f.fileno()
    if sniff(os.pread(fd, HEAD_SIZE, 0)) is not None:
        return False
    return file_is_text(fd)
