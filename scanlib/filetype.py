"""File-type rules for skipping the scan by extension.

The patent lets files of types unlikely to carry viruses pass unscanned,
chosen by name ([ftp] skip_extensions, e.g. '.txt, .gif').  A name is only
a claim: a file whose first bytes say it is an executable, a script with a
#! line, an archive or compressed file, an OLE2 (macro-capable Office)
document, a PDF or an RTF is scanned whatever its name.  Pure functions;
callers pass the first HEAD_SIZE bytes of the file.

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
    is none of the risky kinds."""
    return extension_skips(name, skip_extensions) and sniff(head) is None
