"""The DATA reader: strict CRLF.CRLF, unstuffing, bare CR/LF, limits.

The property: any byte stream, fed in any chunking, is either delivered
exactly as the reference unstuffing says or refused, and the end of data
(hence what follows it: the next commands) is the same in every chunking.
Never two transactions out of one DATA.
"""

import io

from hypothesis import given, strategies as st

from smtpproxy.datareader import DataReader, stuff


def reference(stream, max_line=1000, max_size=10 ** 9):
    """Line by line, the slow obvious way: (ended, content, error, rest)."""
    data = b"\r\n" + stream
    i = data.find(b"\r\n.\r\n")
    if i < 0:
        return (False, None, None, None)
    body, rest = data[2:i + 2], data[i + 5:]
    error = None
    lines = body.split(b"\r\n")[:-1] if body else []
    out = []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            error = error or "bare"
        if len(line) + 2 > max_line:
            error = error or "line"
        out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    content = b"".join(out)
    if error is None and len(content) > max_size:
        error = "size"
    return (True, content if error is None else None, error, rest)


def run(stream, cuts, max_line=1000, max_size=10 ** 9):
    out = io.BytesIO()
    r = DataReader(out, max_size=max_size, max_line=max_line)
    pos = 0
    ended = False
    for c in sorted(set(cuts)) + [len(stream)]:
        if c <= pos:
            continue
        ended = r.feed(stream[pos:c])
        pos = c
        if ended:
            r.feed(stream[pos:])
            break
    return ended, (out.getvalue() if r.error is None else None), r.error, (r.rest if ended else None)


alphabet = st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"a", b"..", b"\r\n.\r\n",
                            b"\r\n..\r\n", b"\n.\r\n", b"\r.\r", b"\n.\n", b"x" * 7, b"MAIL"])
streams = st.lists(alphabet, max_size=40).map(b"".join)


@given(streams, st.lists(st.integers(0, 200), max_size=8), st.sampled_from([10, 20, 1000]))
def test_matches_reference_in_any_chunking(stream, cuts, max_line):
    ended, content, error, rest = run(stream, cuts, max_line=max_line)
    rended, rcontent, rerror, rrest = reference(stream, max_line=max_line)
    assert ended == rended
    if ended:
        assert rest == rrest                       # the same end: never a second transaction
        assert (error is None) == (rerror is None)
        if error is None:
            assert content == rcontent
        elif rerror in ("bare",) and error != "line":
            assert error == rerror


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                max_size=20), st.lists(st.integers(0, 400), max_size=6))
def test_stuffing_roundtrip(lines, cuts):
    content = b"".join(l + b"\r\n" for l in lines)
    wire = stuff(content) + b".\r\n"
    ended, got, error, rest = run(wire, cuts)
    assert ended and error is None and rest == b""
    assert got == content


def test_b01_lf_dot_crlf_is_not_the_end():
    stream = (b"Subject: x\r\n\r\nbody.\n.\r\nMAIL FROM:<boss@example.org>\r\n"
              b"RCPT TO:<r@example.net>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n")
    ended, content, error, rest = run(stream, [])
    assert ended and error == "bare" and rest == b"QUIT\r\n"


def test_smuggling_variants_all_refused():
    # (CR CRLF . CRLF is a real end: its CRLF.CRLF is there; the CR before it is
    # what refuses that message.  See test_cr_crlf_dot_crlf_ends_and_refuses.)
    for variant in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\n\r\n.\n"):
        stream = b"a\r\nb" + variant + b"MAIL FROM:<x@y>\r\n" + b"\r\n.\r\nQUIT\r\n"
        for cut in range(len(stream)):
            ended, content, error, rest = run(stream, [cut])
            assert ended and error is not None and rest == b"QUIT\r\n", (variant, cut)


def test_dot_only_first_line_ends_empty_message():
    assert run(b".\r\nNOOP\r\n", []) == (True, b"", None, b"NOOP\r\n")


def test_b03_unstuffing():
    stream = b"a\r\n...\r\n..\r\n..x\r\n. s\r\n....\r\n.\r\n"
    ended, content, error, rest = run(stream, [5, 9])
    assert content == b"a\r\n..\r\n.\r\n.x\r\n s\r\n...\r\n"


def test_long_line_refused_and_memory_bounded():
    out = io.BytesIO()
    r = DataReader(out, max_size=10 ** 9, max_line=1000)
    for _ in range(1000):
        assert not r.feed(b"x" * 4096)
        assert len(r.pending) < 1000
    assert r.feed(b"\r\n.\r\n")
    assert r.error == "line"


def test_size_limit():
    ended, content, error, rest = run(b"12345678\r\n" * 10 + b".\r\n", [3, 50], max_size=50)
    assert ended and error == "size"
    ended, content, error, rest = run(b"12345678\r\n" * 5 + b".\r\n", [], max_size=50)
    assert ended and error is None and len(content) == 50


def test_cr_crlf_dot_crlf_ends_and_refuses():
    ended, content, error, rest = run(b"a\r\r\n.\r\nNOOP\r\n", [])
    assert ended and error == "bare" and rest == b"NOOP\r\n"
