"""The streaming MIME/uuencode splitter on the hostile cases and on our own
hostile structures: what is extracted (decode-sensitive: the EICAR bytes
must come out whole), what is called malformed, and that the result does
not depend on how the file is cut into blocks."""

import base64
import email
import email.policy
import binascii
import io
import os

import pytest
from hypothesis import given, settings, strategies as st

from scanlib.spool import Spool
from smtpproxy import mime
from tests.rig.clamd import EICAR

CASES = os.path.join(os.path.dirname(__file__), "cases")
B64 = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path))
    yield s
    s.cleanup()


def split(spool, data, **kw):
    return mime.split(io.BytesIO(data), spool, **kw)


def found(st):
    """Indexes of portions holding EICAR whole."""
    out = []
    for p in st.portions:
        with open(p.path, "rb") as f:
            if EICAR in f.read():
                out.append(p.index)
    return out


def case(name):
    with open(os.path.join(CASES, name), "rb") as f:
        return f.read()


def multipart(*parts, boundary=b"b", close=True, ctype=None):
    head = ctype or b'Content-Type: multipart/mixed; boundary="' + boundary + b'"'
    out = b"Subject: t\r\nMIME-Version: 1.0\r\n" + head + b"\r\n\r\npreamble\r\n"
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p + b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n"
    return out


ATT = b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" + B64
TXT = b"Content-Type: text/plain\r\n\r\nhello\r\n"


def test_b08a_duplicate_cte_is_malformed(spool):
    st = split(spool, case("B08a-duplicate-cte-base64-first.eml"))
    assert "duplicate content-transfer-encoding" in st.malformed


def test_b12_unterminated_part_is_scanned(spool):
    st = split(spool, case("B12-missing-final-boundary.eml"))
    assert found(st) == ["1.2"] and not st.malformed


def test_b16b_part_limit(spool):
    st = split(spool, case("B16b-mime-part-count-5000.eml"), max_parts=1000)
    assert any("MIME parts" in m for m in st.malformed)


def test_b20a_uuencode_in_text(spool):
    data = case("B20a-uuencode-in-text-plain.eml")
    st = split(spool, data)
    assert found(st) == ["1/uu1"]
    start, end = st.portions[0].span
    assert data[start:].startswith(b"begin 644 eicar.com\r\n")
    assert data[:end].endswith(b"end\r\n")


def test_b23_names_are_only_metadata(spool):
    st = split(spool, case("B23-quarantine-path-traversal.eml"))
    assert len(found(st)) == 5
    for p in st.portions:
        assert os.path.dirname(p.path) == spool.directory


def test_b26_both_parts(spool):
    st = split(spool, case("B26-instream-size-limit.eml"))
    assert found(st) == ["1.3"] and st.portions[0].size == 40960


@pytest.mark.parametrize("block", [1, 3, 7, 64, 1000])
def test_block_size_does_not_matter(spool, monkeypatch, block):
    data = multipart(TXT, ATT, b"Content-Type: message/rfc822\r\n\r\n" + multipart(ATT, boundary=b"in"),
                     b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
                     + binascii.b2a_qp(EICAR).replace(b"\n", b"\r\n"), close=False)
    monkeypatch.setattr(mime, "BLOCK", 1 << 16)
    ref = split(spool, data)
    monkeypatch.setattr(mime, "BLOCK", block)
    st = split(spool, data)
    assert [(p.index, p.size) for p in st.portions] == [(p.index, p.size) for p in ref.portions]
    assert found(st) == ["1.2", "1.3.1.1", "1.4"]
    assert st.malformed == ref.malformed == []


@pytest.mark.parametrize("data,why", [
    (multipart(ATT, ctype=b'Content-Type: multipart/mixed; boundary="b"; boundary="c"'), "duplicate boundary"),
    (multipart(ATT, ctype=b"Content-Type: multipart/mixed; boundary*=''b"), "multipart without"),
    (multipart(ATT, ctype=b"Content-Type: multipart/mixed; boundary*0=b"), "RFC 2231"),
    (multipart(ATT, ctype=b'Content-Type: multipart/mixed; boundary="\\b"'), "escaped"),
    (multipart(ATT + b"\r\n--bjunk\r\nQUJD\r\n"), "junk after a boundary"),
    (multipart(b"Content-Type: text/plain\r\nno colon here\r\n\r\nx"), "not a field"),
    (multipart(b"Content-Type: text/plain\r\n \r\n\r\nx"), "whitespace-only"),
    (multipart(b"Content-Type: text/plain\r\nContent-Type: text/html\r\n\r\nx"), "duplicate content-type"),
    (multipart(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: x-foo\r\n\r\nx"), "unknown Content-Transfer"),
    (multipart(b"Content-Type: application/x\r\nContent-Transfer-Encoding: base64\r\n\r\nQUJD!REVG\r\n"), "junk in base64"),
    (multipart(b"Content-Type: application/x\r\nContent-Transfer-Encoding: base64\r\n\r\nQQ==\r\nQUJD\r\n"), "padding in mid-stream"),
    (multipart(b"Content-Type: message/partial; id=x; number=1\r\n\r\nx"), "message/partial"),
    (multipart(b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--'), "reuses an outer boundary"),
    (multipart(b'Content-Type: multipart/mixed; boundary="i"\r\nContent-Transfer-Encoding: base64\r\n\r\n--i--'), "encoded multipart"),
    (multipart(b"Content-Type: application/x\r\n--b\r\n"), "separator missing"),
    (b"Subject: x\r\nnot a header\r\n\r\nbody\r\n", "not a field"),
])
def test_ambiguous_structures_are_malformed(spool, data, why):
    st = split(spool, data)
    assert any(why in m for m in st.malformed), st.malformed


def test_depth_limit(spool):
    data = ATT
    for i in range(30):
        data = multipart(data, boundary=b"d%d" % i).split(b"\r\n", 2)[2].replace(
            b"MIME-Version: 1.0\r\n", b"")
    st = split(spool, b"Subject: x\r\n" + data, max_depth=10)
    assert any("deeper" in m for m in st.malformed)


def test_uuencode_inside_base64_text_and_x_uuencode_part(spool):
    uu = b"begin 644 e.com\n" + binascii.b2a_uu(EICAR[:45]) + binascii.b2a_uu(EICAR[45:]) + b"`\nend\n"
    text_b64 = base64.encodebytes(b"see below\n" + uu).replace(b"\n", b"\r\n")
    data = multipart(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n" + text_b64,
                     b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n"
                     + uu.replace(b"\n", b"\r\n"))
    st = split(spool, data)
    assert found(st) == ["1.1/uu1", "1.2/uu1"] and not st.malformed
    assert st.portions[1].span is None           # inside an encoded part: no in-place span


def test_unterminated_uu_block_and_last_delimiter_without_crlf(spool):
    data = (b"Subject: x\r\n\r\nbegin 600 a.com\r\n" + binascii.b2a_uu(EICAR[:45]).replace(b"\n", b"\r\n")
            + binascii.b2a_uu(EICAR[45:]).replace(b"\n", b"\r\n"))
    st = split(spool, data)
    assert found(st) == ["1/uu1"] and st.portions[0].span[1] is None
    st = split(spool, multipart(ATT, close=False) + b"--b--")
    assert found(st) == ["1.1"] and st.root.children[0].end < len(multipart(ATT, close=False))


def test_plain_message_has_no_portion(spool):
    st = split(spool, b"Subject: x\r\n\r\nhello\r\nbeginning is not begin\r\n")
    assert st.portions == [] and not st.malformed and not st.has_encoded


@settings(max_examples=200)
@given(st.lists(st.sampled_from([b"--b\r\n", b"--b--\r\n", b"\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
                                 b"Content-Transfer-Encoding: base64\r\n", b"QUJD\r\n", b"=\r\n",
                                 b"begin 644 x\r\n", b"end\r\n", b"M86)C\r\n", b"x: y\r\n", b" cont\r\n",
                                 b"Content-Type: message/rfc822\r\n", b"--b", b"\r"]), max_size=40).map(b"".join))
def test_hostile_soup_never_crashes(data):
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        s = Spool(d)
        st = mime.split(io.BytesIO(data), s)
        for p in st.portions:
            assert os.path.exists(p.path)
        assert st.root is not None
        s.cleanup()


# -- differential: where Python's email package finds the virus, so must we (or malformed) --

def _leaf(enc, ctype):
    if enc == "base64":
        body = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
    elif enc == "quoted-printable":
        body = binascii.b2a_qp(EICAR).replace(b"\n", b"\r\n") + b"\r\n"
    else:
        body = EICAR + b"\r\n"
    return (b"Content-Type: " + ctype + b"\r\nContent-Transfer-Encoding: " + enc.encode()
            + b"\r\n\r\n" + body)


@st.composite
def messages(draw):
    depth = draw(st.integers(0, 3))
    enc = draw(st.sampled_from(["base64", "quoted-printable", "7bit"]))
    ctype = draw(st.sampled_from([b"application/octet-stream", b"image/gif", b"text/plain"]))
    part = _leaf(enc, ctype)
    for i in range(depth):
        b = draw(st.sampled_from([b"a", b"b'(x)", b"=_1", b"zz" * 20])) + b"%d" % i
        quote = draw(st.booleans())
        siblings = draw(st.integers(0, 2))
        kids = [b"Content-Type: text/plain\r\n\r\nfiller %d\r\n" % k for k in range(siblings)]
        kids.insert(draw(st.integers(0, len(kids))), part)
        head = b"Content-Type: multipart/mixed; boundary=" + (b'"%s"' % b if quote else b)
        if draw(st.booleans()):
            head = b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + head
        part = head + b"\r\n\r\n" + b"".join(b"--" + b + b"\r\n" + k + b"\r\n" for k in kids) \
            + b"--" + b + b"--\r\n"
    return b"Subject: gen\r\nMIME-Version: 1.0\r\n" + part


def _mutate(data, ops):
    lines = data.split(b"\r\n")
    for op, at in ops:
        i = at % len(lines)
        if op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "junk":
            lines.insert(i, b"--junk")
        elif op == "space":
            lines[i] = b" " + lines[i]
        elif op == "bare":
            lines[i] = lines[i] + b"\n"
        if not lines:
            lines = [b""]
    return b"\r\n".join(lines)


def _python_finds(data):
    """Does the email package's reading decode EICAR out of some part
    where the raw bytes do not show it (raw ones the whole-message scan
    sees anyway)?"""
    if EICAR in data:
        return False
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and EICAR in payload:
            return True
    return False


@settings(max_examples=300)
@given(messages(), st.lists(st.tuples(st.sampled_from(["drop", "dup", "junk", "space", "bare"]),
                                      st.integers(0, 10 ** 6)), max_size=3))
def test_differential_against_python_email(data, ops):
    import tempfile
    data = _mutate(data, ops)
    if not _python_finds(data):
        return
    with tempfile.TemporaryDirectory() as d:
        s = Spool(d)
        st_ = mime.split(io.BytesIO(data), s)
        ours = found(st_)
        s.cleanup()
    assert ours or st_.malformed, data


def _yenc(data, name=b"e.com"):
    out = bytearray()
    for c in data:
        o = (c + 42) % 256
        out += (b"=" + bytes([(o + 64) % 256])) if o in (0, 10, 13, 61) else bytes([o])
    return (b"=ybegin line=128 size=%d name=%s\r\n" % (len(data), name) + bytes(out)
            + b"\r\n=yend size=%d\r\n" % len(data))


def test_yenc_block_extracted_in_place(spool):
    data = b"Subject: y\r\n\r\nsee the file\r\n" + _yenc(EICAR) + b"bye\r\n"
    st = split(spool, data)
    assert found(st) == ["1/yenc1"] and st.portions[0].filename == "e.com"
    start, end = st.portions[0].span
    assert data[start:].startswith(b"=ybegin ") and data[end:] == b"bye\r\n"
    allbytes = bytes(range(256)) * 2
    st = split(spool, b"Subject: y\r\n\r\n" + _yenc(allbytes))
    with open(st.portions[0].path, "rb") as f:
        assert f.read() == allbytes


def test_multipart_whose_boundary_never_occurs_is_malformed(spool):
    data = multipart(ATT, boundary=b"Abc").replace(b"--Abc", b"--abc")
    st = split(spool, data)
    assert any("no body part" in m for m in st.malformed)


@pytest.mark.parametrize("cte", ["base64", "quoted-printable"])
def test_encoded_rfc822_is_malformed_and_split_inside(spool, cte):
    inner = (b"Subject: inner\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\n" + ATT
             + b"\r\n--i\r\nContent-Type: text/plain\r\n\r\nhi\r\n" + _yenc(EICAR) + b"--i--\r\n")
    body = base64.encodebytes(inner).replace(b"\n", b"\r\n") if cte == "base64" \
        else binascii.b2a_qp(inner)                      # b2a_qp keeps the CRLFs
    outer = multipart(TXT, b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: "
                      + cte.encode() + b"\r\n\r\n" + body)
    st = split(spool, outer)
    assert "encoded message/rfc822" in st.malformed
    hits = [p for p in st.portions if p.index != "1.2"]
    assert found(st)[-2:] == ["1.2.1.1", "1.2.1.2/yenc1"]
    # their rewriting target is the encoded part that holds them
    assert all(p.entity.index == "1.2" and p.span is None for p in hits)
    spans = __import__("smtpproxy.rewrite", fromlist=["plan"]).plan(
        [__import__("smtpproxy.rewrite", fromlist=["Removal"]).Removal(p, "x") for p in hits])
    assert len(spans) == 1 and outer[spans[0][0]:].startswith(b"Content-Type: message/rfc822")


def test_uuencode_inside_a_binary_leaf_and_message_global(spool):
    uu = (b"begin 644 e.com\r\n" + binascii.b2a_uu(EICAR[:45]).replace(b"\n", b"\r\n")
          + binascii.b2a_uu(EICAR[45:]).replace(b"\n", b"\r\n") + b"`\r\nend\r\n")
    data = multipart(b"Content-Type: application/octet-stream\r\n\r\nheader\r\n" + uu,
                     b"Content-Type: message/global\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                     + base64.encodebytes(b"Subject: g\r\n\r\n" + _yenc(EICAR)).replace(b"\n", b"\r\n"))
    st = split(spool, data)
    assert found(st) == ["1.1/uu1", "1.2.1/yenc1"] and not st.malformed


def _re_cache_keys():
    import re
    # CPython's compiled-pattern cache (3.11: _cache; 3.12+: also _cache2).
    return set(getattr(re, "_cache", {})) | set(getattr(re, "_cache2", {}))


def test_prefork_parent_compiles_every_pattern_a_split_needs(spool):
    """The warm forking parent (scanlib.prefork.preload) leaves every regex
    mime.split compiles in re's cache, so a forked child compiles none."""
    import re
    from scanlib import prefork
    re.purge()
    prefork.preload("smtpproxy.main")
    before = _re_cache_keys()
    uu = b"begin 644 e.com\r\n" + binascii.b2a_uu(b"x" * 10).replace(b"\n", b"\r\n") + b"`\r\nend\r\n"
    part = (b'Content-Type: text/plain; charset="us\\-ascii"; format=flowed\r\n\r\n'
            + uu + b"=ybegin line=128 size=3 name=y.bin\r\nabc\r\n=yend size=3\r\n")
    st = split(spool, multipart(part, TXT))
    assert [p.index for p in st.portions] == ["1.1/uu1", "1.1/yenc2"] and not st.malformed
    st = split(spool, multipart(part, ctype=b'Content-Type: multipart/mixed; boundary="b\\\\x"'))
    assert "escaped character in a quoted boundary" in st.malformed
    assert _re_cache_keys() - before == set()
