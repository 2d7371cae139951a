"""Rewriting for strip/replace/quarantine, parsed back: valid MIME, every
clean part byte-identical, the removed part named with its finding; and
the SMTP policy as a matrix."""

import base64
import binascii
import email
import email.policy
import io

import pytest

from scanlib import policy
from scanlib.spool import Spool
from scanlib.verdict import Clean, Infected, Unscannable
from smtpproxy import mime, rewrite as W
from tests.rig.clamd import EICAR

B64 = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
NAME = "Test.EICAR"


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path))
    yield s
    s.cleanup()


def infected_portions(st):
    out = []
    for p in st.portions:
        with open(p.path, "rb") as f:
            if EICAR in f.read():
                out.append(p)
    return out


def run(spool, data, action="replace", qid=None):
    src = io.BytesIO(data)
    st = mime.split(src, spool)
    removals = [W.Removal(p, "infected: %s" % NAME, qid) for p in infected_portions(st)]
    spans = W.plan(removals)
    out = io.BytesIO()
    if spans is None:
        W.whole_body(src, st, out, action, "gw.example", removals or [W.Removal(None, NAME)])
    else:
        W.rewrite(src, spans, out, action, "gw.example")
    return st, spans, out.getvalue()


NESTED = (b"From: a@example.com\r\nSubject: nested\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/mixed; boundary=\"o\"\r\n\r\n"
          b"--o\r\nContent-Type: text/plain\r\n\r\nouter text\r\n"
          b"--o\r\nContent-Type: multipart/alternative; boundary=\"i\"\r\n\r\n"
          b"--i\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
          b"--i\r\nContent-Type: application/octet-stream; name=\"v.exe\"\r\n"
          b"Content-Transfer-Encoding: base64\r\n\r\n" + B64 +
          b"--i--\r\n"
          b"--o\r\nContent-Type: message/rfc822\r\n\r\n"
          b"Subject: inner\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n"
          b"--m\r\nContent-Type: application/zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
          + B64 + b"--m\r\nContent-Type: text/plain\r\n\r\nkept inner\r\n--m--\r\n"
          b"--o\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
          b"--o--\r\n")


@pytest.mark.parametrize("action", ["strip", "replace", "quarantine"])
def test_nested_parts_replaced_rest_identical(spool, action):
    st, spans, out = run(spool, NESTED, action, qid="20260101-000000-000000-abcdef012345"
                         if action == "quarantine" else None)
    assert spans is not None and len(spans) == 2
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert not msg.defects and not any(p.defects for p in msg.walk())
    types = [p.get_content_type() for p in msg.walk()]
    assert types == ["multipart/mixed", "text/plain", "multipart/alternative", "text/plain",
                     "text/plain", "message/rfc822", "multipart/mixed", "text/plain",
                     "text/plain", "image/png"]
    assert EICAR not in out and B64 not in out
    # every byte outside the two removed spans is the original
    pos = 0
    rebuilt = b""
    for start, end, _, _ in spans:
        assert out.find(NESTED[pos:start]) >= 0
        pos = end
    assert out.endswith(NESTED[pos:])
    assert out.startswith(NESTED[:spans[0][0]])
    notes = [p.get_content() for p in msg.walk() if "virusgw on gw.example" in str(p.get_payload())]
    assert len(notes) == 2 and all(NAME in n for n in notes)
    assert 'file "v.exe"' in notes[0]
    if action == "quarantine":
        assert all("quarantine id: 20260101-000000-000000-abcdef012345" in n for n in notes)


def test_uuencoded_block_replaced_in_place(spool):
    uu = (b"begin 644 e.com\r\n" + binascii.b2a_uu(EICAR[:45]).replace(b"\n", b"\r\n")
          + binascii.b2a_uu(EICAR[45:]).replace(b"\n", b"\r\n") + b"`\r\nend\r\n")
    data = b"Subject: uu\r\n\r\nbefore\r\n" + uu + b"after\r\n"
    st, spans, out = run(spool, data, "strip")
    assert out.startswith(b"Subject: uu\r\n\r\nbefore\r\nvirusgw on gw.example removed")
    assert out.endswith(b"\r\nafter\r\n") and b"begin 644" not in out
    assert b'part 1/uu1 (text/plain, file "e.com")' in out


def test_single_part_whole_body(spool):
    data = (b"Subject: s\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\nX-Keep: yes\r\n  folded\r\n\r\n" + B64)
    st, spans, out = run(spool, data)
    assert spans is None
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_content_type() == "text/plain" and not msg.defects
    assert msg["Subject"] == "s" and msg["X-Keep"].split() == ["yes", "folded"]
    assert len(msg.get_all("Content-Type")) == 1 and NAME in msg.get_content()


def test_add_headers_sanitised():
    h = W.add_headers("ClamAV 1.4\r\nX-Evil: 1", "gw", "Infected (a\nb)")
    assert h.count(b"\r\n") == 2 and h.startswith(b"X-Virus-Scanned: virusgw on gw (ClamAV 1.4??X-Evil: 1)")


# -- policy as a matrix --------------------------------------------------------------

VERDICTS = {"clean": Clean(), "infected": Infected(["V"]), "size": Unscannable("size-limit"),
            "encrypted": Unscannable("encrypted"), "unavailable": Unscannable("unavailable")}


@pytest.mark.parametrize("action", ["pass", "reject", "discard", "strip", "replace", "quarantine"])
@pytest.mark.parametrize("verdict", sorted(VERDICTS))
@pytest.mark.parametrize("malformed", [False, True])
def test_policy_matrix(action, verdict, malformed):
    import itertools
    for on_malformed, on_unscannable, on_unavailable in itertools.product(
            ["reject", "quarantine", "pass"], ["reject", "quarantine", "pass"],
            ["tempfail", "reject", "pass"]):
        _check(action, on_malformed, on_unscannable, on_unavailable, verdict, malformed)


def _check(action, on_malformed, on_unscannable, on_unavailable, verdict, malformed):
    view = {"action": action, "on_malformed": on_malformed}
    scanner = {"on_unscannable": on_unscannable, "on_unavailable": on_unavailable}
    d = policy.smtp(VERDICTS[verdict], malformed, view, scanner)
    if verdict == "infected":                       # the strongest cause wins
        assert d.cause == "infected"
        want = {"reject": ("reject", 554, "5.7.1"), "discard": ("discard", 250, "2.7.0")}.get(
            action, (action, None, None))
        assert (d.action, d.code, d.status) == want
    elif malformed:
        assert d.cause == "malformed"
        assert d.action == {"reject": "reject", "quarantine": "hold", "pass": "pass"}[on_malformed]
    elif verdict in ("size", "encrypted"):
        assert d.cause == "unscannable"
        assert d.action == {"reject": "reject", "quarantine": "hold", "pass": "pass"}[on_unscannable]
        if d.action == "reject":
            assert d.code == (552 if verdict == "size" else 554)
    elif verdict == "unavailable":
        assert d.action == on_unavailable
        assert d.code == {"tempfail": 451, "reject": 554, "pass": None}[on_unavailable]
    else:
        assert d.action == "deliver"
    if d.action in ("reject", "tempfail"):
        assert str(d.code)[0] in "45"
