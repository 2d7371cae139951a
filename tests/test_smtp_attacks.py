"""Red team: virusgw-smtpproxy attacked as a hostile client and a hostile
message would, through the real thing (socket activation, the private
clamd, the aiosmtpd sink upstream; the rig of test_smtp_proxy.py).

Every test checks what the client saw, what the sink received (nothing,
or exactly the right bytes) and that the spool directory is empty
afterwards.  Bugs found here are marked xfail(strict=True) until the
proxy is fixed (the fix flips them), then stay as regression tests: the
SMTPUTF8 path checks, the multipart with no body part, the virus in a
kept header, the yEnc block, the encoded message/rfc822 and the
hung-scanner exit were all found this way."""

import base64
import json
import os
import random
import socket
import time

import pytest

from tests.rig.activate import wait_until
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.smtp import Dialogue, stuff
from tests.test_smtp_proxy import CLEAN, cert, proxy, raw_session, sink, stored  # noqa: F401

pytestmark = pytest.mark.clamd

B64_EICAR = base64.encodebytes(EICAR).replace(b"\n", b"\r\n")      # ends in CRLF
HELLO = b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
OUTSIDE = "[networks]\ninside = 127.0.0.1/32\n"


# -- helpers ----------------------------------------------------------------------------

def spool_of(tmp_path):
    return os.path.join(str(tmp_path), "spool")


def assert_spool_empty(tmp_path):
    """The spool holds nothing once the proxy is done (it may still be
    ending: poll with a deadline)."""
    spool = spool_of(tmp_path)
    wait_until(lambda: os.listdir(spool) == [], timeout=10,
               what="an empty spool (holds %r)" % (os.listdir(spool),))


def codes(replies):
    return [c for c, _ in replies]


def no_traceback(replies):
    for code, lines in replies:
        assert code is not None and 200 <= code < 600, (code, lines)
        for line in lines:
            assert "Traceback" not in line and "Error" not in line[:40], line
            assert line[:3].isdigit() and line[3:4] in (" ", "-"), line


def dialogue(hp, stream, source=None):
    """(greeting code, replies) for a raw byte stream sent at once."""
    greeting, replies = raw_session(hp, stream, source=source)
    assert greeting[0] == 220
    no_traceback(replies)
    return replies


def one_message(hp, content, source=None):
    """A complete transaction for one unstuffed message; the DATA reply."""
    replies = dialogue(hp, HELLO + stuff(content) + b"QUIT\r\n", source=source)
    assert codes(replies)[:4] == [250, 250, 250, 354], replies
    assert codes(replies)[-1] == 221, replies
    assert len(replies) == 6, replies
    return replies[4]


def mime(*parts, boundary=b"bb", head=b"", preamble=b"", close=True):
    """A multipart/mixed message from raw parts (each: headers CRLF CRLF body)."""
    out = (b"From: s@example.com\r\nTo: r@example.net\r\nSubject: attack\r\nMIME-Version: 1.0\r\n"
           + (head or b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n")
           + b"\r\n" + preamble)
    for p in parts:
        out += b"--" + boundary + b"\r\n" + p
        if not p.endswith(b"\r\n"):
            out += b"\r\n"
    if close:
        out += b"--" + boundary + b"--\r\n"
    return out


def b64_part(name=b"e.com", payload=None, cte=b"Content-Transfer-Encoding: base64\r\n"):
    body = B64_EICAR if payload is None else base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"Content-Type: application/octet-stream; name=\"" + name + b"\"\r\n" + cte
            + b"\r\n" + body)


TEXT_PART = b"Content-Type: text/plain\r\n\r\nhello\r\n"


def refused(reply, codes_ok=(554,)):
    code, lines = reply
    assert code in codes_ok, reply
    return "\n".join(lines)


# -- SMTP smuggling ------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")

SMUGGLING = {
    "lf-dot-crlf": b"\n.\r\n",
    "lf-dot-lf": b"\n.\n",
    "cr-dot-cr": b"\r.\r",
    "crlf-dot-cr": b"\r\n.\r",
    "crlf-dot-lf": b"\r\n.\n",
    "cr-dot-crlf": b"\r.\r\n",
    "crcrlf-dot-crcrlf": b"\r\r\n.\r\r\n",
    "crlf-dot-crcrlf": b"\r\n.\r\r\n",
    "bare-cr-mid-line": b" a\rb ",
    "bare-lf-mid-line": b" a\nb ",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_one_refusal_nothing_forwarded(tmp_path, clamd, sink, name):
    """A fake end of data followed by a whole second transaction: one 5xx
    for the whole DATA after the real CRLF.CRLF, no reply for the smuggled
    commands, nothing forwarded, the session in sync afterwards."""
    stream = (HELLO + b"Subject: carrier\r\n\r\ncarrier" + SMUGGLING[name] + SMUGGLED
              + b".\r\nNOOP\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 550, 250, 221], replies
    assert "5.6.11" in replies[4][1][0]
    assert sink.messages == []
    assert_spool_empty(tmp_path)


def test_smuggling_dot_line_split_across_segments(tmp_path, clamd, sink):
    """The end of data and a bare-LF fake end, each split over TCP segments
    (a reader that looks only inside one segment misses both)."""
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        d = Dialogue(*hp)
        d.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        d.reply()
        d.send(HELLO)
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        # 1: a fake end whose LF and dot arrive apart, then a real end split
        for piece in (b"Subject: a\r\n\r\nline", b"\n", b".", b"\r\n", SMUGGLED, b"\r", b"\n.",
                      b"\r", b"\n"):
            d.send(piece)
            time.sleep(0.05)
        code, lines = d.reply()
        assert code == 550 and "5.6.11" in lines[0]
        # 2: a clean message whose CRLF.CRLF is split byte by byte
        d.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(3)] == [250, 250, 354]
        for piece in (b"Subject: b\r\n\r\nbody", b"\r", b"\n", b".", b"\r", b"\n"):
            d.send(piece)
            time.sleep(0.05)
        assert d.reply()[0] == 250
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
        d.close()
    (frm, to, body, _), = sink.messages
    assert stored(body)[0] == b"Subject: b\r\n\r\nbody\r\n"
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("body", [
    b"Subject: nul\r\n\r\nbefore\r\n\x00.\r\n" + SMUGGLED + b"\x00.\r\nafter\r\n",
    b"Subject: nul\r\n\r\nbefore\r\n.\x00\r\n" + SMUGGLED + b"after\r\n",
], ids=["nul-dot", "dot-nul"])
def test_nul_bytes_never_end_data_nor_reach_upstream_as_a_second_transaction(
        tmp_path, clamd, sink, body):
    """NUL around a dot line: an upstream that drops NULs (several do) would
    see CRLF.CRLF.  RFC 5321/6152 data carries no NUL: it is refused, or at
    the very least delivered as exactly one message with the NULs intact
    (so that the stuffing on the way out cannot be fooled)."""
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, body)
    assert len(sink.messages) <= 1
    if reply[0] == 250:
        content, _ = stored(sink.messages[0][2])
        assert content == body
    else:
        assert 500 <= reply[0] < 600 and sink.messages == []
    assert_spool_empty(tmp_path)


# -- pipelining abuse ----------------------------------------------------------------------

def test_pipelined_transaction_after_a_refused_data_in_one_packet(tmp_path, clamd, sink):
    bad = b"Subject: bad\r\n\r\nbare\nlf\r\n.\r\n"
    good = b"Subject: good\r\n\r\nok\r\n"
    stream = (HELLO + bad + b"MAIL FROM:<s2@example.com>\r\nRCPT TO:<r2@example.net>\r\nDATA\r\n"
              + stuff(good) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 550, 250, 250, 354, 250, 221], replies
    (frm, to, body, _), = sink.messages
    assert (frm, to) == ("s2@example.com", ["r2@example.net"]) and stored(body)[0] == good
    assert_spool_empty(tmp_path)


def test_rset_mid_pipeline_drops_the_first_envelope(tmp_path, clamd, sink):
    stream = (b"EHLO c.example\r\nMAIL FROM:<first@example.com>\r\nRCPT TO:<a@example.net>\r\n"
              b"RSET\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
              b"MAIL FROM:<second@example.com>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
              + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 250, 503, 503, 250, 250, 354, 250, 221], replies
    (frm, to, body, _), = sink.messages
    assert frm == "second@example.com" and to == ["c@example.net"]
    assert stored(body)[0] == CLEAN
    assert_spool_empty(tmp_path)


def test_data_pipelined_after_all_recipients_refused(tmp_path, clamd, sink):
    """RFC 2920: DATA after only refused RCPTs gets 5xx; the message the
    client pipelined behind it must not become a message (its lines are
    commands now: unknown ones, never a transaction of their own)."""
    stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<x@example.org>\r\n"
              b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream, OUTSIDE) as hp:
        replies = dialogue(hp, stream, source="127.0.0.2")
    c = codes(replies)
    assert c[:3] == [250, 250, 550] and c[3] in (503, 554) and c[4:] == [500] * 4 + [221], replies
    assert sink.messages == []
    assert_spool_empty(tmp_path)


def test_pipelined_transaction_behind_starttls_is_dropped(tmp_path, clamd, sink, cert):
    """Plaintext queued behind STARTTLS (CVE-2011-0411 class) must not
    survive into the TLS session: a whole envelope is sent, then DATA in TLS
    must find no transaction."""
    import ssl
    text = "tls_cert = %s\ntls_key = %s\n" % cert
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(b"EHLO c.example\r\n")
        assert d.reply()[0] == 250
        d.send(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\n")
        assert d.reply()[0] == 220
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        d.s = ctx.wrap_socket(d.s)
        d.send(b"EHLO c.example\r\nDATA\r\n")
        code, lines = d.reply()
        assert code == 250
        code, lines = d.reply()
        assert code == 503, lines          # no MAIL/RCPT survived the handshake
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
        d.close()
    assert sink.messages == []
    assert_spool_empty(tmp_path)


# -- oversize lines and messages ------------------------------------------------------------

def test_long_command_lines_keep_replies_in_sync(tmp_path, clamd, sink):
    stream = (b"EHLO c.example\r\n" + b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n"
              + b"MAIL FROM:<" + b"a" * 5000 + b"@example.com>\r\n"
              + b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
              + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 500, 250, 500, 250, 250, 354, 250, 221], replies
    assert stored(sink.messages[0][2])[0] == CLEAN and len(sink.messages) == 1
    assert_spool_empty(tmp_path)


def test_megabyte_of_junk_without_newline(tmp_path, clamd, sink):
    junk = bytes(random.Random(7).choice(b"ABCDEFGH \t\x01\x7f\xff") for _ in range(1 << 20))
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, b"EHLO c.example\r\n" + junk + b"\r\nNOOP\r\nQUIT\r\n")
    assert codes(replies) == [250, 500, 250, 221], replies
    assert sink.messages == []


def test_oversize_message_and_long_data_line_then_in_sync(tmp_path, clamd, sink):
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 400          # ~7 KB
    long_line = b"Subject: long\r\n\r\n" + b"y" * 1500 + b"\r\nend\r\n"
    stream = (HELLO + stuff(big)
              + b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n" + stuff(long_line)
              + b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n" + stuff(CLEAN)
              + b"NOOP\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream, "max_message_size = 4000\n") as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 552, 250, 250, 354, 550, 250, 250, 354, 250,
                              250, 221], replies
    assert "5.3.4" in replies[4][1][0]
    (m,) = sink.messages
    assert stored(m[2])[0] == CLEAN
    assert_spool_empty(tmp_path)


# -- relay attempts from outside ------------------------------------------------------------

RELAY_REFUSED = [
    b"<victim@example.org>",
    b"<victim%example.org@example.net>",
    b"<victim%example.org%example.net@example.net>",
    b"<example.org!victim@example.net>",
    b"<\"victim@example.org\"@example.net>",
    b"<\"victim%example.org\"@example.net>",
    b"<\"example.org!victim\"@example.net>",
    b"<\"victim\\@example.org\"@example.net>",
    b"<@example.net:victim@example.org>",
    b"<@example.net,@example.net:victim@example.org>",
    b"<victim@example.org.>",
    b"<victim@EXAMPLE.ORG>",
    b"<victim@example.net.example.org>",
    b"<victim@sub.example.net>",
    b"<victim@xn--exmple-cua.net>",
    b"<victim@ex\xc3\xa4mple.net>",
    b"<victim@[127.0.0.1]>",
    b"<victim@[IPv6:::1]>",
    b"<victim@[192.0.2.1]>",
    b"<Postmaster@example.org>",
    b"<>",
    b"victim@example.org",
    b"victim@example.net",
    b" <victim@example.org>",
    b"<victim@example.org >",
    b"< victim@example.org>",
    b"<victim@example.org@example.net>",
    b"<victim@example.net@example.org>",
    b"<victim@example.net>,<victim@example.org>",
    b"<victim@example.net> <victim@example.org>",
    b"<victim(comment)@example.org>",
    b"<victim@example.net%example.org>",
    b"<victim@example.net\tx>",
    b"<victim@example..net>",
    b"<victim@.example.net>",
    b"<victim@example.net..>",
    b"<\"\"@example.org>",
    b"<v\xe4ctim@example.net>",
    b"<victim@example.net> NOTIFY=NEVER ORCPT=rfc822;victim@example.org",
]
RELAY_OK = [(b"<ok1@example.net>", "ok1@example.net"),
            (b"<ok2@EXAMPLE.NET.>", "ok2@EXAMPLE.NET"),
            (b"<@x.example,@y.example:ok3@Example.Net>", "ok3@Example.Net")]


def test_relay_attempts_from_outside_refused(tmp_path, clamd, sink):
    stream = b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\n"
    for r in RELAY_REFUSED:
        stream += b"RCPT TO:" + r + b"\r\n"
    for r, _ in RELAY_OK:
        stream += b"RCPT TO:" + r + b"\r\n"
    stream += b"DATA\r\n" + stuff(CLEAN) + b"QUIT\r\n"
    with proxy(tmp_path, clamd, sink.upstream, "max_errors = 1000\n" + OUTSIDE) as hp:
        replies = dialogue(hp, stream, source="127.0.0.2")
    got = codes(replies)
    assert got[:2] == [250, 250]
    for r, (code, lines) in zip(RELAY_REFUSED, replies[2:]):
        assert 500 <= code < 600, (r, code, lines)
    n = len(RELAY_REFUSED)
    assert got[2 + n:] == [250] * len(RELAY_OK) + [354, 250, 221], replies[2 + n:]
    (frm, to, body, _), = sink.messages
    assert to == [m for _, m in RELAY_OK]
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("rcpt", [b"<victim%example.org@example.net>",
                                  b"<\"victim@example.org\"@example.net>",
                                  b"<@example.net:victim@example.org>"])
def test_relay_forms_from_inside_pass_unchanged_in_meaning(tmp_path, clamd, sink, rcpt):
    """The same forms from an inside client are relayed, and what goes
    upstream is the bare mailbox (route dropped), not a rewritten one."""
    stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:" + rcpt + b"\r\nDATA\r\n"
              + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream, OUTSIDE) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 250, 221]
    expected = rcpt[1:-1].decode().split(":")[-1]
    assert sink.messages[0][1] == [expected]


# -- header injection in MAIL/RCPT parameters -----------------------------------------------

@pytest.mark.parametrize("line,code", [
    (b"MAIL FROM:<s@example.com> ENVID=x\rRCPT TO:<victim@example.org>", 500),
    (b"MAIL FROM:<s@example.com> BODY=8BITMIME\x00RCPT TO:<victim@example.org>", 500),
    (b"MAIL FROM:<s@example.com>\x00", 500),
    (b"MAIL FROM:<s@example.com> X-INJECT=a", 555),
    (b"MAIL FROM:<s@example.com> AUTH=<>", 555),
    (b"MAIL FROM:<s@example.com> XCLIENT=ADDR=1.2.3.4", 501),
    (b"MAIL FROM:<s@example.com> SIZE=1 SIZE=2", 501),
    (b"MAIL FROM:<s@example.com> SIZE=-1", 501),
    (b"MAIL FROM:<s@example.com> SIZE=1e3", 501),
    (b"MAIL FROM:<s@example.com> BODY=BINARYMIME", 555),
    (b"MAIL FROM:<s@example.com>\tSIZE=1", 501),
    (b"MAIL FROM:<s@example.com> RET=FULL\r", 500),
    (b"MAIL FROM:<s@example.com>>", 501),
    (b"MAIL FROM:<s@example.com> =x", 501),
    (b"MAIL FROM:<s@exa\xffmple.com>", 501),
    (b"MAIL FROM:<\xc3\xbc@example.com>", 501),
])
def test_mail_parameter_injection_refused(tmp_path, clamd, sink, line, code):
    stream = (b"EHLO c.example\r\n" + line + b"\r\nMAIL FROM:<s@example.com>\r\n"
              b"RCPT TO:<r@example.net> NOTIFY=NEVER\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
              + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    # a bare CR splits nothing: the whole line is one refused command
    assert codes(replies) == [250, code, 250, 555, 250, 354, 250, 221], replies
    (frm, to, body, extra), = sink.messages
    assert frm == "s@example.com" and to == ["r@example.net"]
    assert extra.get("mail_options") == [] and extra.get("rcpt_options") == []
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("mail,rcpt", [
    (b"<s\xff\xfe@example.com>", b"<r@example.net>"),
    (b"<s@example.com>", b"<r\xff@example.net>"),
    (b"<s@example.com>", b"<r@ex\xc3.example.net>"),
    (b"<s@example.com>", b"<r\xed\xa0\x80@example.net>"),          # a UTF-8-encoded surrogate
], ids=["mail-ff-fe", "rcpt-ff", "rcpt-domain-truncated", "rcpt-surrogate"])
def test_smtputf8_path_must_be_valid_utf8(tmp_path, clamd, sink, mail, rcpt):
    """Under SMTPUTF8 the path is UTF-8 (RFC 6531 3.3, RFC 3629): invalid
    sequences are refused (501), never passed to the MTA as raw bytes."""
    stream = (b"EHLO c.example\r\nMAIL FROM:" + mail + b" SMTPUTF8\r\nRCPT TO:" + rcpt + b"\r\n"
              b"RSET\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    c = codes(replies)
    bad_at = 1 if mail != b"<s@example.com>" else 2
    assert c[bad_at] == 501, replies
    assert sink.messages == []


def test_smtputf8_valid_mailbox_passes(tmp_path, clamd, sink):
    stream = ("EHLO c.example\r\nMAIL FROM:<sé@example.com> SMTPUTF8\r\n"
              "RCPT TO:<ré@example.net>\r\nDATA\r\n").encode() + stuff(CLEAN) + b"QUIT\r\n"
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 250, 221], replies
    assert sink.messages[0][0] == "sé@example.com" and sink.messages[0][1] == ["ré@example.net"]


# -- MIME evasion -----------------------------------------------------------------------------
# Each message carries EICAR where at least one reasonable reader sees it
# (and, in the harmless variants, nothing to find): never delivered intact.

def _nested_rfc822(levels, leaf):
    msg = leaf
    for i in range(levels):
        msg = (b"Subject: level %d\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
               b"boundary=\"n%d\"\r\n\r\n--n%d\r\nContent-Type: message/rfc822\r\n\r\n" % (i, i, i)
               + msg + b"\r\n--n%d--\r\n" % i)
    return msg


def _uu(data, name=b"e.com"):
    import binascii
    out = b"begin 644 " + name + b"\r\n"
    for i in range(0, len(data), 45):
        out += binascii.b2a_uu(data[i:i + 45]).replace(b"\n", b"\r\n")
    return out + b"`\r\nend\r\n"


def _b64(data):
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def evasions(V):
    """The evasion messages carrying the payload V."""
    B = _b64(V)
    return {
        "dup-cte-7bit-first": mime(TEXT_PART, b64_part(payload=V,
            cte=b"Content-Transfer-Encoding: 7bit\r\nContent-Transfer-Encoding: base64\r\n")),
        "dup-boundary-param": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                   head=b"Content-Type: multipart/mixed; boundary=\"aa\"; boundary=\"bb\"\r\n"),
        "conflicting-content-types": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                          head=b"Content-Type: multipart/mixed; boundary=\"aa\"\r\n"
                                               b"Content-Type: multipart/mixed; boundary=\"bb\"\r\n"),
        "rfc2231-boundary": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                 head=b"Content-Type: multipart/mixed; boundary=\"aa\"; boundary*=''bb\r\n"),
        "rfc2231-continued-boundary": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                           head=b"Content-Type: multipart/mixed; boundary*0=b; boundary*1=b\r\n"),
        "quoted-escaped-boundary": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                        head=b"Content-Type: multipart/mixed; boundary=\"b\\b\"\r\n"),
        "unquoted-boundary-with-comment": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                               head=b"Content-Type: multipart/mixed; boundary=bb (aa)\r\n"),
        "boundary-in-preamble": mime(TEXT_PART, boundary=b"bb",
                                     preamble=b"--aa\r\nContent-Transfer-Encoding: base64\r\n\r\n" + B
                                              + b"--aa--\r\n"),
        "missing-final-boundary": mime(TEXT_PART, b64_part(payload=V), close=False),
        "header-body-separator-missing": mime(TEXT_PART, b64_part(payload=V).replace(b"base64\r\n\r\n", b"base64\r\n")),
        "base64-junk-mid-stream": mime(TEXT_PART, b64_part(payload=V).replace(B[:4], B[:2] + b"!" + B[2:4], 1)),
        "base64-padding-mid-stream": mime(TEXT_PART, b"Content-Type: application/octet-stream\r\n"
                                          b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(V[:1])
                                          + base64.encodebytes(V[1:]).replace(b"\n", b"\r\n")),
        "cte-BASE64-trailing-space": mime(TEXT_PART, b64_part(payload=V, cte=b"Content-Transfer-Encoding: BASE64 \r\n")),
        "cte-folded": mime(TEXT_PART, b64_part(payload=V, cte=b"Content-Transfer-Encoding:\r\n\tBase64\r\n")),
        "cte-quoted": mime(TEXT_PART, b64_part(payload=V, cte=b"Content-Transfer-Encoding: \"base64\"\r\n")),
        "cte-comment": mime(TEXT_PART, b64_part(payload=V, cte=b"Content-Transfer-Encoding: base64 (yes)\r\n")),
        "x-uuencode-part": mime(TEXT_PART, b"Content-Type: application/octet-stream\r\n"
                                b"Content-Transfer-Encoding: x-uuencode\r\n\r\n" + _uu(V)),
        "uuencode-non-mime-body": b"Subject: uu\r\n\r\nsee below\r\n\r\n" + _uu(V) + b"\r\nbye\r\n",
        "uuencode-in-base64-text": mime(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                                        + base64.encodebytes(b"hi\r\n" + _uu(V)).replace(b"\n", b"\r\n")),
        "uuencode-in-qp-text": mime(b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable"
                                    b"\r\n\r\n=62egin 644 e.com\r\n" + _uu(V).split(b"\r\n", 1)[1]),
        "nested-rfc822-6-levels": _nested_rfc822(6, mime(TEXT_PART, b64_part(payload=V))),
        "base64-rfc822": mime(b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                              + base64.encodebytes(mime(TEXT_PART, b64_part(payload=V))).replace(b"\n", b"\r\n")),
        "zero-length-parts": mime(b"\r\n", b"Content-Transfer-Encoding: base64\r\n\r\n\r\n", TEXT_PART,
                                  b64_part(payload=V)),
        "boundary-prefix-lax-reader": mime(b"Content-Type: text/plain\r\n\r\nhello\r\n--bbx\r\n"
                                           b"Content-Type: application/octet-stream\r\n"
                                           b"Content-Transfer-Encoding: base64\r\n\r\n" + B),
        "delimiter-transport-padding": (mime(TEXT_PART, b64_part(payload=V)).replace(b"--bb\r\nContent-Type: app",
                                                                              b"--bb  \t\r\nContent-Type: app")),
        "space-before-colon": mime(TEXT_PART, b64_part(payload=V, cte=b"Content-Transfer-Encoding : base64\r\n")),
        "ct-header-name-case": mime(TEXT_PART, b64_part(payload=V), head=b"CONTENT-TYPE: MULTIPART/MIXED; BOUNDARY=\"bb\"\r\n"),
        "nested-multipart-reuses-boundary": mime(b"Content-Type: multipart/mixed; boundary=\"bb\"\r\n\r\n--bb\r\n"
                                                 + b64_part(payload=V) + b"--bb--\r\n"),
        "content-after-close-delimiter": mime(TEXT_PART) + b"--bb\r\n" + b64_part(payload=V) + b"--bb--\r\n",
        "boundary-case-mismatch": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                       head=b"Content-Type: multipart/mixed; boundary=\"BB\"\r\n"),
        "empty-boundary": mime(TEXT_PART, b64_part(payload=V), boundary=b"",
                               head=b"Content-Type: multipart/mixed; boundary=\"\"\r\n"),
        "boundary-regex-chars": mime(TEXT_PART, b64_part(payload=V), boundary=b"(.)+?=/:,_'-"),
        "boundary-70-chars": mime(TEXT_PART, b64_part(payload=V), boundary=b"b" * 70),
        "quoted-fake-boundary-param": mime(TEXT_PART, b64_part(payload=V), boundary=b"bb",
                                           head=b"Content-Type: multipart/mixed; x=\"; boundary=aa \";\r\n"
                                                b" boundary=bb\r\n"),
        "no-mime-version": mime(TEXT_PART, b64_part(payload=V)).replace(b"MIME-Version: 1.0\r\n", b""),
        "digest-default-rfc822": mime(b"\r\n" + mime(TEXT_PART, b64_part(payload=V), boundary=b"in"),
                                      head=b"Content-Type: multipart/digest; boundary=\"bb\"\r\n"),
        "qp-attachment": mime(b"Content-Type: application/octet-stream; name=\"q.com\"\r\n"
                              b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                              + __import__("quopri").encodestring(V.replace(b"\r\n", b"\n"), quotetabs=True).replace(b"\n", b"\r\n")
                              .replace(b"X", b"=58")),
        "base64-spaces-in-lines": mime(TEXT_PART, b64_part(payload=V).replace(B[:8], B[:4] + b" " + B[4:8], 1)),
    }


EVASIONS = evasions(EICAR)
HARMLESS = evasions(b"nothing to see here, just harmless text\r\n" * 3)


@pytest.mark.parametrize("name", sorted(EVASIONS))
def test_mime_evasion_never_delivered(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, EVASIONS[name])
    refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


# The proxy's own reader must see the same.  clamd (ScanMail) parses the
# whole message too and catches most of these by itself, so "never
# delivered" alone cannot tell whether the splitter saw the part: the
# reply must name the portion it came from, and the harmless variant of
# each ambiguous form must be refused as malformed (5.6.0) on its own.
AMBIGUOUS_FORMS = ["dup-cte-7bit-first", "dup-boundary-param", "conflicting-content-types",
                   "rfc2231-boundary", "rfc2231-continued-boundary", "quoted-escaped-boundary",
                   "unquoted-boundary-with-comment", "header-body-separator-missing",
                   "base64-junk-mid-stream", "base64-padding-mid-stream", "cte-quoted", "cte-comment",
                   "boundary-prefix-lax-reader", "space-before-colon",
                   "nested-multipart-reuses-boundary", "empty-boundary",
                   "boundary-case-mismatch"]
CLEAN_FORMS = ["x-uuencode-part", "uuencode-non-mime-body", "uuencode-in-base64-text",
               "uuencode-in-qp-text", "nested-rfc822-6-levels", "base64-rfc822",
               "missing-final-boundary", "delimiter-transport-padding", "cte-BASE64-trailing-space",
               "cte-folded", "zero-length-parts", "ct-header-name-case", "boundary-regex-chars",
               "boundary-70-chars", "quoted-fake-boundary-param", "no-mime-version",
               "digest-default-rfc822", "qp-attachment", "base64-spaces-in-lines"]
# RFC readers ignore preamble and epilogue: delivered when harmless (the
# EICAR variants above are still refused: clamd's whole-message scan).
INVISIBLE_FORMS = ["boundary-in-preamble", "content-after-close-delimiter"]


def test_every_evasion_is_classified():
    names = set(AMBIGUOUS_FORMS) | set(CLEAN_FORMS) | set(INVISIBLE_FORMS)
    assert names == set(EVASIONS)


@pytest.mark.parametrize("name", CLEAN_FORMS)
def test_splitter_names_the_infected_portion(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, EVASIONS[name])
    text = refused(reply)
    assert EICAR_NAME in text and "part 1" in text, text
    assert sink.messages == []
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("name", CLEAN_FORMS + INVISIBLE_FORMS)
def test_unambiguous_forms_harmless_delivered_byte_for_byte(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, HARMLESS[name])
    if name == "base64-rfc822" and reply[0] != 250:
        # RFC 2046 5.2.1 forbids encoding a message/rfc822: malformed is right too
        assert "5.6.0" in refused(reply) and sink.messages == []
        return
    assert reply[0] == 250, reply
    content, status = stored(sink.messages[0][2])
    assert content == HARMLESS[name] and status == "X-Virus-Status: Clean"
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("name", AMBIGUOUS_FORMS)
def test_ambiguous_forms_malformed_on_their_own(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, HARMLESS[name])
    assert "5.6.0" in refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


HARMLESS_AMBIGUOUS = {
    "message-partial": (b"Subject: p\r\nMIME-Version: 1.0\r\nContent-Type: message/partial; "
                        b"id=\"x@y\"; number=1; total=2\r\n\r\nSubject: inner\r\n\r\nhalf\r\n"),
    "part-count-bomb": mime(*[b"Content-Type: text/plain\r\n\r\nx\r\n"] * 1200),
    "depth-bomb": _nested_rfc822(40, b"Subject: deep\r\n\r\nbottom\r\n"),
    "multipart-depth-bomb": (lambda n: b"Subject: d\r\nMIME-Version: 1.0\r\n"
                             + b"".join(b"Content-Type: multipart/mixed; boundary=\"d%d\"\r\n\r\n--d%d\r\n"
                                        % (i, i) for i in range(n))
                             + b"Content-Type: text/plain\r\n\r\nbottom\r\n"
                             + b"".join(b"--d%d--\r\n" % i for i in reversed(range(n))))(60),
    "dup-cte": mime(TEXT_PART, b64_part(payload=b"harmless", cte=b"Content-Transfer-Encoding: 7bit\r\n"
                                        b"Content-Transfer-Encoding: base64\r\n")),
    "rfc2231-boundary": mime(TEXT_PART, boundary=b"bb",
                             head=b"Content-Type: multipart/mixed; boundary*=''bb\r\n"),
}


@pytest.mark.parametrize("name", sorted(HARMLESS_AMBIGUOUS))
def test_ambiguous_structure_goes_to_on_malformed(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, HARMLESS_AMBIGUOUS[name])
    assert "5.6.0" in refused(reply)
    assert sink.messages == []
    with proxy(tmp_path, clamd, sink.upstream, "on_malformed = pass\n") as hp:
        reply = one_message(hp, HARMLESS_AMBIGUOUS[name])
    assert reply[0] == 250
    content, status = stored(sink.messages[0][2])
    assert content == HARMLESS_AMBIGUOUS[name]
    assert_spool_empty(tmp_path)


def test_zero_length_and_empty_parts_clean_pass_byte_for_byte(tmp_path, clamd, sink):
    msg = mime(b"\r\n", b"Content-Transfer-Encoding: base64\r\n\r\n\r\n",
               b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
               b"\r\n\r\n", TEXT_PART)
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, msg)
    assert reply[0] == 250
    assert stored(sink.messages[0][2])[0] == msg
    assert_spool_empty(tmp_path)


# -- hostile filenames for quarantine -------------------------------------------------------

HOSTILE_NAMES = [
    b"../../../../../../tmp/vgw-attack-probe.com",
    b"/tmp/vgw-attack-probe-abs.com",
    b"=?UTF-8?B?" + base64.b64encode(b"../../../../tmp/vgw-attack-probe-2047.com") + b"?=",
    b"..\\\\..\\\\vgw-attack-probe-win.com",
    b"con.com",
]


def _q_entries(tmp_path):
    qdir = os.path.join(str(tmp_path), "quarantine")
    return qdir, sorted(os.listdir(qdir))


def test_hostile_filenames_stay_inside_quarantine(tmp_path, clamd, sink):
    long_name = b"filename*0=\"" + b"A" * 200 + b"\";\r\n" + b"".join(
        b" filename*%d=\"%s\";\r\n" % (i, b"B" * 200) for i in range(1, 30)) + b" filename*30=\"x.com\""
    parts = [TEXT_PART]
    for n in HOSTILE_NAMES:
        parts.append(b"Content-Type: application/octet-stream; name=\"" + n + b"\"\r\n"
                     b"Content-Disposition: attachment; filename=\"" + n + b"\"\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + B64_EICAR)
    parts.append(b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment;\r\n "
                 + long_name + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + B64_EICAR)
    msg = mime(*parts)
    probes = ["/tmp/vgw-attack-probe.com", "/tmp/vgw-attack-probe-abs.com",
              "/tmp/vgw-attack-probe-2047.com"]
    for p in probes:
        if os.path.exists(p):
            os.unlink(p)
    with proxy(tmp_path, clamd, sink.upstream, "action = quarantine\n") as hp:
        reply = one_message(hp, msg)
    assert reply[0] == 250, reply
    qdir, entries = _q_entries(tmp_path)
    entries = [e for e in entries if not e.startswith(".")]
    assert len(entries) == len(HOSTILE_NAMES) + 1
    for e in entries:
        assert sorted(os.listdir(os.path.join(qdir, e))) == ["content", "meta.json"]
        assert open(os.path.join(qdir, e, "content"), "rb").read() == EICAR
        meta = json.load(open(os.path.join(qdir, e, "meta.json")))
        assert meta["viruses"] == [EICAR_NAME]
    for p in probes:
        assert not os.path.exists(p)
    content, status = stored(sink.messages[0][2])
    assert EICAR not in content and b"WDVPIVAlQEFQ" not in content
    assert_spool_empty(tmp_path)


def test_nul_in_attachment_name(tmp_path, clamd, sink):
    """A NUL in a filename: refused (NUL in data), or quarantined with no raw
    NUL echoed anywhere (reply, notice, metadata as written)."""
    msg = mime(TEXT_PART, b64_part(name=b"evil\x00.txt\x00../../x.com"))
    with proxy(tmp_path, clamd, sink.upstream, "action = quarantine\n") as hp:
        reply = one_message(hp, msg)
    qdir, entries = _q_entries(tmp_path)
    if reply[0] == 250:
        (content_body, status) = stored(sink.messages[0][2])
        assert b"\x00" not in content_body and EICAR not in content_body
        entries = [e for e in entries if not e.startswith(".")]
        assert len(entries) == 1
        raw_meta = open(os.path.join(qdir, entries[0], "meta.json"), "rb").read()
        assert b"\x00" not in raw_meta
    else:
        assert 500 <= reply[0] < 600 and sink.messages == []
    assert all("\x00" not in l for l in reply[1])
    assert_spool_empty(tmp_path)


# -- scanner down --------------------------------------------------------------------------

def test_scanner_down_tempfail_nothing_delivered_session_in_sync(tmp_path, clamd, sink):
    dead = "unix:%s/nonexistent.sock, tcp:127.0.0.1:1" % tmp_path
    stream = HELLO + stuff(CLEAN) + b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\n" \
        b"DATA\r\n" + stuff(mime(TEXT_PART, b64_part())) + b"RSET\r\nQUIT\r\n"
    with proxy(tmp_path, clamd, sink.upstream, scanner=dead) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 451, 250, 250, 354, 451, 250, 221], replies
    assert "4.7.0" in replies[4][1][-1] or "4.7.0" in replies[4][1][0]
    assert sink.messages == []
    assert_spool_empty(tmp_path)


def test_scanner_down_pass_delivers_marked_unscanned(tmp_path, clamd, sink):
    dead = "unix:%s/nonexistent.sock" % tmp_path
    with proxy(tmp_path, clamd, sink.upstream, scanner=dead,
               scanner_text="on_unavailable = pass\n") as hp:
        reply = one_message(hp, CLEAN)
    assert reply[0] == 250
    content, status = stored(sink.messages[0][2])
    assert content == CLEAN and "Clean" not in status and "nscanned" in status
    assert_spool_empty(tmp_path)


# -- no traceback ever reaches the client ---------------------------------------------------

def test_garbage_bytes_get_protocol_replies_only(tmp_path, clamd, sink):
    rnd = random.Random(1)
    lines = [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 80))).replace(b"\n", b"")
             .replace(b"\r", b"") + b"\r\n" for _ in range(30)]
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, b"".join(lines))
    assert codes(replies)[-1] == 421 and all(c >= 500 for c in codes(replies)[:-1]), replies
    assert len(replies) == 20
    assert sink.messages == []


@pytest.mark.parametrize("line,bad", [
    (b"EHLO \xff\xfe\xfd", True), (b"HELO \xc3(", True), (b"\xff\xfeEHLO x", True),
    (b"RSET \xff", True), (b"MAIL FROM:<\xff@example.com>", True), (b"RCPT TO:<r@\xc3(.net>", True),
    (b"DATA \xff", True), (b"QUIT\xff", True), (b"STARTTLS \xff", True), (b"\x1b[31mEHLO x", True),
    (b"EHLO x\x7f", True), (b"EHLO x\x1b[2J", True),
    (b"VRFY \xff", False), (b"HELP \xed\xa0\x80", False), (b"NOOP \xff", False),
])
def test_invalid_utf8_and_controls_in_commands(tmp_path, clamd, sink, line, bad):
    """Invalid UTF-8 and control characters get a plain protocol reply (an
    error where the argument matters), never a traceback, and the session
    goes on."""
    stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\n" + line + b"\r\n"
              b"RSET\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
              + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    c = codes(replies)
    assert c[:2] == [250, 250] and (500 <= c[2] < 600) == bad, replies
    assert c[3:] == [250, 250, 250, 354, 250, 221], replies
    assert len(sink.messages) == 1
    assert_spool_empty(tmp_path)


def _wait_spool_file(tmp_path):
    wait_until(lambda: os.listdir(spool_of(tmp_path)), timeout=10, what="a spool file")


@pytest.mark.parametrize("how", ["close", "reset", "after-fake-end"])
def test_abrupt_disconnect_mid_data(tmp_path, clamd, sink, how):
    import struct
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(HELLO)
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(b"Subject: cut\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000)
        _wait_spool_file(tmp_path)
        if how == "after-fake-end":
            d.send(b"\n.\r\n" + b"\r\n.\r")            # everything but the last LF
        if how == "reset":
            d.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        d.close()
        assert_spool_empty(tmp_path)
        # the session's process ended (its per-connection log line is written)
        log = os.path.join(str(tmp_path), "virusgw.log")
        wait_until(lambda: "conn=end" in open(log).read(), timeout=10, what="conn=end")
    assert sink.messages == []


def test_disconnect_during_scan_of_a_large_message(tmp_path, clamd, sink):
    """The client goes away right after its final dot: whatever happens to
    the message, no temp file (message or portion) is left behind."""
    msg = mime(TEXT_PART, *[b64_part(payload=os.urandom(200000), name=b"f%d" % i) for i in range(5)])
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(HELLO)
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(stuff(msg))
        d.close()
        assert_spool_empty(tmp_path)
    assert len(sink.messages) <= 1


# -- more state and limit edges ------------------------------------------------------------

def test_idle_client_mid_data_gets_421_nothing_delivered(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream, "timeout = 1\n") as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(HELLO)
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(b"Subject: stalled\r\n\r\nhalf a message\r\n")
        code, lines = d.reply()             # the proxy gives up after 1 s of silence
        assert code == 421 and "4.4.2" in lines[0], lines
        assert d.reply()[0] is None
        d.close()
        assert_spool_empty(tmp_path)
    assert sink.messages == []


def test_not_tls_after_starttls_closes_quietly(tmp_path, clamd, sink, cert):
    text = "tls_cert = %s\ntls_key = %s\n" % cert
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(b"EHLO c.example\r\nSTARTTLS\r\n")
        assert [d.reply()[0] for _ in range(2)] == [250, 220]
        d.send(b"MAIL FROM:<s@example.com>\r\n" + bytes(range(256)) * 4 + b"\r\n")
        got = b""
        while True:
            try:
                data = d.s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not data:
                break
            got += data
        d.close()
        assert b"Traceback" not in got and b"Error" not in got and b"250" not in got
        assert got == b"" or got[:1] == b"\x15", got[:100]       # nothing, or a TLS alert
        log = os.path.join(str(tmp_path), "virusgw.log")
        wait_until(lambda: "conn=end" in open(log).read(), timeout=10, what="conn=end")
    assert sink.messages == []


def test_header_block_bomb_is_malformed(tmp_path, clamd, sink):
    msg = (b"Subject: bomb\r\nX-Filler: x\r\n" + b"\tcontinued continued continued\r\n" * 40000
           + b"\r\nbody\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, msg)
    assert "5.6.0" in refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


def test_helo_mid_transaction_resets_it(tmp_path, clamd, sink):
    stream = (b"EHLO c.example\r\nMAIL FROM:<first@example.com>\r\nRCPT TO:<a@example.net>\r\n"
              b"EHLO c.example\r\nDATA\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<b@example.net>\r\n"
              b"DATA\r\n" + stuff(CLEAN) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 250, 503, 250, 250, 354, 250, 221], replies
    (frm, to, body, _), = sink.messages
    assert frm == "s@example.com" and to == ["b@example.net"]
    assert_spool_empty(tmp_path)


def test_size_and_line_limits_are_exact(tmp_path, clamd, sink):
    """max_message_size counts unstuffed octets: the limit itself passes,
    one more is refused; a DATA line of 1000 octets with its CRLF passes,
    1001 is refused (RFC 5321 4.5.3.1.6)."""
    head = b"Subject: s\r\n\r\n"
    filler = (b"a" * 98 + b"\r\n") * 29
    at_limit = head + filler + b"z" * (3000 - len(head) - len(filler) - 2) + b"\r\n"
    over = head + filler + b"z" * (3000 - len(head) - len(filler) - 1) + b"\r\n"
    assert len(at_limit) == 3000 and len(over) == 3001
    line_ok2 = b"Subject: l\r\n\r\n" + b"c" * 998 + b"\r\n"
    line_over = b"Subject: l\r\n\r\n" + b"c" * 999 + b"\r\n"
    again = b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
    stream = (HELLO + stuff(at_limit) + again + stuff(over) + again + stuff(line_ok2) + again
              + stuff(line_over) + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream, "max_message_size = 3000\n") as hp:
        replies = dialogue(hp, stream)
    assert codes(replies) == [250, 250, 250, 354, 250, 250, 250, 354, 552, 250, 250, 354, 250,
                              250, 250, 354, 550, 221], replies
    assert [stored(m[2])[0] for m in sink.messages] == [at_limit, line_ok2]
    assert_spool_empty(tmp_path)


def test_empty_message_and_dot_right_after_data(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, HELLO + b".\r\nQUIT\r\n")
    assert codes(replies) == [250, 250, 250, 354, 250, 221], replies
    assert stored(sink.messages[0][2])[0] == b""
    assert_spool_empty(tmp_path)


def test_bare_lf_in_a_command_never_makes_a_relayed_command(tmp_path, clamd, sink):
    """A command with a bare LF inside is refused; whatever follows the LF
    gets at most its own reply, never a relay to the upstream."""
    stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\nRCPT TO:<victim@example.org>\r\n"
              b"NOOP\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream, OUTSIDE) as hp:
        replies = dialogue(hp, stream, source="127.0.0.2")
    c = codes(replies)
    assert c[0] == 250 and c[-2:] == [250, 221] and all(500 <= x < 600 for x in c[1:-2]), replies
    assert sink.messages == []


def test_upstream_refusing_one_recipient(tmp_path, clamd):
    from tests.rig.smtp import Sink
    with Sink(refuse_rcpt={"gone@example.net"}) as s:
        stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<gone@example.net>\r\n"
                  b"RCPT TO:<r@example.net>\r\nDATA\r\n" + stuff(CLEAN) + b"QUIT\r\n")
        with proxy(tmp_path, clamd, s.upstream) as hp:
            replies = dialogue(hp, stream)
        assert codes(replies) == [250, 250, 550, 250, 354, 250, 221], replies
        assert "no such user" in replies[2][1][0]
        assert [m[1] for m in s.messages] == [["r@example.net"]]
    assert_spool_empty(tmp_path)


# -- rewriting actions against evasions: what is delivered is clean ----------------------------

EXTRA = {
    "eicar-in-top-header": b"Subject: hdr\r\nX-Payload: " + EICAR + b"\r\n\r\nclean body\r\n",
    "eicar-in-part-header": mime(b"Content-Type: text/plain\r\nX-Payload: " + EICAR + b"\r\n\r\nhello\r\n",
                                 TEXT_PART),
    "eicar-in-epilogue": mime(TEXT_PART) + b"epilogue " + EICAR + b"\r\n",
    "eicar-in-preamble-plain": mime(TEXT_PART, preamble=EICAR + b"\r\n"),
}


def _clamd_verdict(clamd, data, tmp_path):
    from scanlib.scanner import Scanner
    path = os.path.join(str(tmp_path), "delivered.eml")
    with open(path, "wb") as f:
        f.write(data)
    return Scanner(endpoints=clamd.endpoints, timeout=20).scan_file(path)


@pytest.mark.parametrize("action", ["strip", "replace", "quarantine"])
@pytest.mark.parametrize("name", sorted(CLEAN_FORMS + INVISIBLE_FORMS + list(EXTRA)))
def test_rewritten_mail_is_clean(tmp_path, clamd, sink, action, name):
    """strip/replace/quarantine deliver; what is delivered holds no virus in
    any encoding (clamd, parsing the delivered mail, finds nothing) and
    still parses as MIME."""
    from scanlib.verdict import Clean
    import email
    import email.policy
    msg = EXTRA.get(name) or EVASIONS[name]
    with proxy(tmp_path, clamd, sink.upstream, "action = %s\n" % action) as hp:
        reply = one_message(hp, msg)
    if reply[0] != 250:
        assert 500 <= reply[0] < 600 and sink.messages == [], reply
    else:
        content, status = stored(sink.messages[0][2])
        assert EICAR not in content
        verdict = _clamd_verdict(clamd, sink.messages[0][2], tmp_path)
        assert isinstance(verdict, Clean), (verdict, content[:3000])
        m = email.message_from_bytes(content, policy=email.policy.default)
        assert m is not None
    assert_spool_empty(tmp_path)


def _yenc(data, name=b"e.com"):
    out = bytearray()
    for c in data:
        o = (c + 42) % 256
        if o in (0, 10, 13, 61):
            out += b"=" + bytes([(o + 64) % 256])
        else:
            out.append(o)
    return (b"=ybegin line=128 size=%d name=%s\r\n" % (len(data), name) + bytes(out)
            + b"\r\n=yend size=%d\r\n" % len(data))


def test_yenc_block_in_text_body_is_scanned(tmp_path, clamd, sink):
    msg = b"Subject: y\r\n\r\nsee the file\r\n" + _yenc(EICAR)
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, msg)
    refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


# -- a hostile or broken upstream never gives the client a traceback ---------------------------

class _FakeUpstream:
    """A TCP 'mail server' that sends `script` on connect and then reads
    until the peer closes.  Stopped (its socket closed) at exit."""

    def __init__(self, script):
        import threading
        self.script = script
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(5)
        self.port = self.srv.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                conn.sendall(self.script)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def close(self):
        self.srv.close()
        self.thread.join(timeout=15)


@pytest.mark.parametrize("script", [
    b"HTTP/1.1 400 Bad Request\r\n\r\n",
    b"\xff\xfe\x00garbage\r\n",
    b"220-ok\r\n" + b"x" * (1 << 20),
    b"220 ok\r\n999 what\r\n250 ok\r\n",
    b"",
], ids=["http", "binary", "endless-line", "bad-code", "silent-close"])
def test_broken_upstream_gives_421_not_a_traceback(tmp_path, clamd, script):
    up = _FakeUpstream(script)
    try:
        with proxy(tmp_path, clamd, "smtp:127.0.0.1:%d" % up.port, "timeout = 5\n") as hp:
            replies = dialogue(hp, b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nQUIT\r\n")
    finally:
        up.close()
    assert 421 in codes(replies), replies
    assert codes(replies)[-1] in (421, 221), replies


def _hung_scanner_session(tmp_path, clamd, sink, portions, scanner_timeout):
    """One message with `portions` encoded parts against a scanner that
    accepts and never answers, deadline 1 s: the 451 after
    the deadline, then QUIT; returns what followed the 221 (None at EOF,
    or the socket timeout raised)."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(50)
    msg = mime(TEXT_PART, *[b64_part(payload=b"harmless %d" % i, name=b"f%d" % i)
                            for i in range(portions)])
    try:
        with proxy(tmp_path, clamd, sink.upstream, "deadline = 1\n",
                   scanner="tcp:127.0.0.1:%d" % hung.getsockname()[1],
                   scanner_text="timeout = %d\n" % scanner_timeout) as hp:
            d = Dialogue(*hp, timeout=10)
            try:
                d.reply()
                d.send(HELLO)
                assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
                d.send(stuff(msg))
                code, lines = d.reply()
                assert code == 451 and "4.7.0" in lines[-1], lines
                assert_spool_empty(tmp_path)
                d.send(b"QUIT\r\n")
                assert d.reply()[0] == 221
                return d.reply()[0]
            finally:
                d.close()
    finally:
        hung.close()
        assert sink.messages == []


@pytest.mark.parametrize("portions", [0, 5])
def test_hung_scanner_deadline_then_quit_closes(tmp_path, clamd, sink, portions):
    """After the deadline answered, QUIT gets 221 and the connection closes
    (the process does not wait for scans still blocked on the hung scanner;
    the client's 10 s socket timeout is far above the expected ~0 s)."""
    assert _hung_scanner_session(tmp_path, clamd, sink, portions, 120) is None


# -- the real sendmail -bs upstream (exim) -------------------------------------------------------

from tests.test_smtp_exim import exim  # noqa: E402,F401  (the private exim fixture)


@pytest.mark.parametrize("body", [
    b"Subject: nul\r\n\r\nbefore\r\n\x00.\r\n" + SMUGGLED + b"\x00.\r\nafter\r\n",
    b"Subject: nul\r\n\r\nbefore\r\n.\x00\r\n" + SMUGGLED + b".\x00\r\nafter\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n" + b".MAIL FROM:<evil@example.com>\r\n.\r\n",
], ids=["nul-dot", "dot-nul", "stuffed-dots"])
def test_exim_never_sees_a_second_transaction(tmp_path, clamd, exim, body):
    """Through a real `sendmail -bs` (exim): NULs around a dot line and
    lines made only of dots never end exim's DATA early; exim delivers one
    message with the content as sent, or nothing."""
    from tests.rig.activate import activated, proxy_argv, write_config
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[smtp]\nupstream = %s\n"
                        "local_domains = example.net\n" % (", ".join(clamd.endpoints), exim.upstream))
    with activated(proxy_argv("virusgw-smtpproxy", conf)) as hp:
        reply = one_message(hp, body)
        if reply[0] == 250:
            wait_until(lambda: exim.messages(), timeout=10, what="exim's delivery")
    got = exim.messages()
    assert len(got) <= 1
    if reply[0] == 250:
        (msg,) = got
        assert msg.replace(b"\r\n", b"\n").endswith(body.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))
        assert b"Subject: smuggled" not in msg.split(b"\n\n", 1)[0]
    else:
        assert 500 <= reply[0] < 600 and got == []
    assert_spool_empty(tmp_path)


# -- an encoded message/rfc822 (RFC 2046 5.2.1 forbids any CTE but 7bit/8bit/binary) ------------

def _encoded_rfc822(inner, cte=b"base64"):
    if cte == b"base64":
        enc = _b64(inner)
    else:
        import quopri
        enc = quopri.encodestring(inner.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")
    return mime(TEXT_PART, b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: " + cte
                + b"\r\n\r\n" + enc)


@pytest.mark.parametrize("cte", [b"base64", b"quoted-printable"])
def test_encoded_rfc822_with_yenc_inside_is_not_delivered(tmp_path, clamd, sink, cte):
    msg = _encoded_rfc822(b"Subject: y\r\n\r\nsee the file\r\n" + _yenc(EICAR), cte)
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, msg)
    refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


@pytest.mark.parametrize("name", ["dup-cte-7bit-first", "boundary-case-mismatch",
                                  "base64-padding-mid-stream"])
def test_encoded_rfc822_with_ambiguous_inside_is_malformed(tmp_path, clamd, sink, name):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        reply = one_message(hp, _encoded_rfc822(HARMLESS[name]))
    assert "5.6.0" in refused(reply)
    assert sink.messages == []
    assert_spool_empty(tmp_path)


def test_hostile_envelope_text_cannot_forge_log_fields(tmp_path, clamd, sink):
    """A quoted local part full of spaces and key=value text: the summary
    line still has exactly one of each field, the hostile text escaped."""
    from tests.test_smtp_proxy import log_text
    sender = b'"x verdict=clean action=deliver\\" qid=forged"@example.com'
    stream = (b"EHLO c.example\r\nMAIL FROM:<" + sender + b">\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
              + stuff(b"Subject: v\r\n\r\n" + EICAR + b"\r\n") + b"QUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        replies = dialogue(hp, stream)
        log = log_text(tmp_path)
    assert codes(replies) == [250, 250, 250, 354, 554, 221], replies
    (line,) = [l for l in log.splitlines() if " id=" in l and " from=" in l]
    words = line.split(" INFO ", 1)[1].split(" ")
    keys = [w.split("=", 1)[0] for w in words]
    assert keys.count("verdict") == 1 and keys.count("action") == 1 and keys.count("qid") == 1, line
    fields = dict(w.split("=", 1) for w in words)
    assert fields["action"] != "deliver" and "forged" in fields["from"]
    assert sink.messages == []


@pytest.mark.parametrize("action", ["strip", "replace", "quarantine"])
@pytest.mark.parametrize("name", ["yenc-text", "yenc-in-b64-rfc822", "uu-in-qp-rfc822"])
def test_rewritten_mail_is_clean_encoded_forms(tmp_path, clamd, sink, action, name):
    """The same for yEnc and for blocks inside an encoded message/rfc822."""
    from scanlib.verdict import Clean
    msg = {"yenc-text": mime(TEXT_PART, b"Content-Type: text/plain\r\n\r\nsee\r\n" + _yenc(EICAR)),
           "yenc-in-b64-rfc822": _encoded_rfc822(b"Subject: y\r\n\r\nhi\r\n" + _yenc(EICAR)),
           "uu-in-qp-rfc822": _encoded_rfc822(b"Subject: u\r\n\r\nhi\r\n" + _uu(EICAR),
                                              b"quoted-printable")}[name]
    with proxy(tmp_path, clamd, sink.upstream, "action = %s\n" % action) as hp:
        reply = one_message(hp, msg)
    if reply[0] != 250:
        assert 500 <= reply[0] < 600 and sink.messages == [], reply
    else:
        content, status = stored(sink.messages[0][2])
        verdict = _clamd_verdict(clamd, sink.messages[0][2], tmp_path)
        assert isinstance(verdict, Clean), (verdict, content[:3000])
        assert _yenc(EICAR).split(b"\r\n")[1] not in content
    assert_spool_empty(tmp_path)
