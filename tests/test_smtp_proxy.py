"""virusgw-smtpproxy end to end: spawned per connection by
systemd-socket-activate --inetd on a loopback port, the real private clamd,
an aiosmtpd sink upstream that stores the raw content, real clients
(smtplib, raw byte streams).  Every SMTP case in tests/cases is here with
its expected outcome; exim and swaks are in test_smtp_exim.py."""

import contextlib
import email
import email.policy
import json
import os
import smtplib
import socket

import pytest

from tests.rig.activate import activated, proxy_argv, write_config, free_port, wait_until
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.smtp import Dialogue, Sink, stuff

CASES = os.path.join(os.path.dirname(__file__), "cases")
pytestmark = pytest.mark.clamd


def case(name):
    with open(os.path.join(CASES, name), "rb") as f:
        return f.read()


@pytest.fixture
def sink():
    with Sink() as s:
        yield s


@contextlib.contextmanager
def proxy(tmp_path, clamd, upstream, text="", host="127.0.0.1", scanner=None, scanner_text=""):
    """The proxy on a loopback port; text goes into [smtp] (and may open
    further sections), scanner_text into [scanner]."""
    if "timeout" not in scanner_text:
        scanner_text += "timeout = 20\n"
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\n%s\n"
                        "[smtp]\nupstream = %s\nlocal_domains = example.net\n%s"
                        % (scanner or ", ".join(clamd.endpoints), scanner_text, upstream, text))
    with activated(proxy_argv("virusgw-smtpproxy", conf), host=host) as hp:
        yield hp


def log_text(tmp_path, until="conn=end"):
    """The proxy's log once it holds `until` (the per-connection line is
    written as the process ends, after the client has its 221)."""
    p = os.path.join(str(tmp_path), "virusgw.log")

    def read():
        text = open(p).read() if os.path.exists(p) else ""
        return text if until in text else ""
    return wait_until(read, timeout=10, what="%r in the log" % until)


def send(hp, msg, rcpts=("r@example.net",), sender="s@example.com"):
    """(error or None, final reply) sending msg through smtplib."""
    s = smtplib.SMTP(hp[0], hp[1], timeout=30)
    try:
        s.ehlo("client.example.com")
        try:
            s.sendmail(sender, list(rcpts), msg)
            return None, s.noop()
        except smtplib.SMTPDataError as e:
            return e, None
    finally:
        s.quit()


def raw_session(hp, stream, source=None):
    d = Dialogue(hp[0], hp[1], source=source)
    try:
        greeting = d.reply()
        d.send(stream)
        return greeting, d.replies()
    finally:
        d.close()


def stored(body):
    """The content the sink got, without our two prepended header lines."""
    assert body.startswith(b"X-Virus-Scanned: ")
    lines = body.split(b"\r\n", 2)
    assert lines[1].startswith(b"X-Virus-Status: ")
    return lines[2], lines[1].decode()


def clamd_version(clamd):
    """What quarantine metadata must name: clamd's VERSION ('ClamAV x/db/date')."""
    from scanlib.scanner import Scanner
    v = Scanner(endpoints=clamd.endpoints).version()
    assert v.startswith("ClamAV ")
    return v


CLEAN = (b"From: s@example.com\r\nTo: r@example.net\r\nSubject: clean\r\nMessage-ID: <c@x>\r\n\r\n"
         b"hello\r\n.leading dot\r\n\r\n")


# -- basics -------------------------------------------------------------------------

def test_clean_mail_byte_for_byte(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        err, _ = send(hp, CLEAN)
        log = log_text(tmp_path)                # before the launcher (and its group) is stopped
    assert err is None
    (frm, to, body, _), = sink.messages
    content, status = stored(body)
    assert content == CLEAN and status == "X-Virus-Status: Clean"
    assert frm == "s@example.com" and to == ["r@example.net"]
    assert "verdict=clean" in log and "action=deliver" in log and "conn=end" in log


def test_infected_rejected_with_finding(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        err, _ = send(hp, b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
    assert err.smtp_code == 554 and EICAR_NAME.encode() in err.smtp_error
    assert b"5.7.1" in err.smtp_error
    assert sink.messages == []


def test_final_reply_echoes_finding_and_upstream(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(stuff(CLEAN))
        code, lines = d.reply()
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
        d.close()
    assert code == 250 and "virusgw: Clean" in lines[0] and "queued as 1" in lines[-1]


def test_pipelining_every_reply_once_in_order(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream, "[networks]\ninside = 127.0.0.1/32\n") as hp:
        stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<a@example.net>\r\n"
                  b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.net>\r\nNOOP\r\nDATA\r\n"
                  + stuff(CLEAN) + b"RSET\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<d@example.net>\r\n"
                  b"DATA\r\n" + stuff(CLEAN) + b"QUIT\r\n")
        greeting, replies = raw_session(hp, stream, source="127.0.0.2")
    assert greeting[0] == 220
    assert [c for c, _ in replies] == [250, 250, 250, 550, 250, 250, 354, 250, 250, 250, 250, 354,
                                       250, 221]
    assert [m[1] for m in sink.messages] == [["a@example.net", "c@example.net"], ["d@example.net"]]


# -- the cases -----------------------------------------------------------------------

def test_b01_smuggling_one_refusal_nothing_forwarded(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        greeting, replies = raw_session(hp, case("B01-smtp-smuggling-lf-dot-crlf.smtp"))
    codes = [c for c, _ in replies]
    assert codes == [250, 250, 250, 354, 550, 221], replies
    assert "5.6.11" in replies[4][1][0]
    assert sink.messages == []


def test_b03_dot_stuffing_roundtrip(tmp_path, clamd, sink):
    raw = case("B03-dot-stuffing-roundtrip.smtp")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        greeting, replies = raw_session(hp, raw)
    assert [c for c, _ in replies] == [250, 250, 250, 354, 250, 221]
    body = raw.split(b"DATA\r\n", 1)[1].rsplit(b"\r\n.\r\nQUIT", 1)[0] + b"\r\n"
    unstuffed = b"\r\n".join(l[1:] if l.startswith(b".") else l for l in body.split(b"\r\n"))
    content, _ = stored(sink.messages[0][2])
    assert content == unstuffed
    assert b"\r\n..\r\n.\r\n.leading dot line\r\n space after dot\r\n...\r\n" in content


def test_b06_block_then_next_transaction(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        greeting, replies = raw_session(hp, case("B06-reject-then-next-transaction.smtp"))
    assert [c for c, _ in replies] == [250, 250, 250, 354, 554, 250, 250, 354, 250, 221]
    (frm, to, body, _), = sink.messages
    assert to == ["rcpt-b@example.net"] and b"clean second message" in body


@pytest.mark.parametrize("name,code", [
    ("B08a-duplicate-cte-base64-first.eml", 554),
    ("B12-missing-final-boundary.eml", 554),
    ("B16b-mime-part-count-5000.eml", 554),
    ("B20a-uuencode-in-text-plain.eml", 554),
    ("B23-quarantine-path-traversal.eml", 554),
])
def test_eml_cases_refused(tmp_path, clamd, sink, name, code):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        err, _ = send(hp, case(name))
    assert err is not None and err.smtp_code == code, err
    assert sink.messages == []


def test_b08a_is_ambiguous_when_scanner_sees_nothing(tmp_path, clamd, sink):
    # With the virus action 'pass', only on_malformed stands between B08a and delivery.
    with proxy(tmp_path, clamd, sink.upstream, "action = pass\n") as hp:
        err, _ = send(hp, case("B08a-duplicate-cte-base64-first.eml").replace(
            b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNU\r\n"
            b"LUZJTEUhJEgrSCo=", b"aGFybWxlc3M="))
    assert err is not None and err.smtp_code == 554 and b"5.6.0" in err.smtp_error
    assert b"duplicate content-transfer-encoding" in err.smtp_error
    assert sink.messages == []


def test_b23_quarantine_stays_inside(tmp_path, clamd, sink):
    probe = "/tmp/vgw-traversal-probe.com"
    if os.path.exists(probe):
        os.unlink(probe)
    with proxy(tmp_path, clamd, sink.upstream, "action = quarantine\n") as hp:
        err, _ = send(hp, case("B23-quarantine-path-traversal.eml"))
    assert err is None
    qdir = os.path.join(str(tmp_path), "quarantine")
    entries = [e for e in os.listdir(qdir) if not e.startswith(".")]
    assert len(entries) == 5
    for e in entries:
        meta = json.load(open(os.path.join(qdir, e, "meta.json")))
        assert meta["viruses"] == [EICAR_NAME] and meta["protocol"] == "smtp"
        assert meta["scanner_version"] == clamd_version(clamd)
        assert sorted(os.listdir(os.path.join(qdir, e))) == ["content", "meta.json"]
        assert open(os.path.join(qdir, e, "content"), "rb").read() == EICAR
    assert not os.path.exists(probe) and not os.path.exists("/etc/cron.d/probe")
    content, status = stored(sink.messages[0][2])
    msg = email.message_from_bytes(content, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == "Please see the attached file.\r\n" or \
        parts[0].get_content().startswith("Please see the attached file.")
    for part, qid in zip(parts[1:], sorted(entries)):
        text = part.get_content()
        assert part.get_content_type() == "text/plain" and "quarantine id:" in text
    for qid in entries:
        assert qid.encode() in content
    assert EICAR not in content and b"WDVPIVAlQEFQ" not in content


def test_b26_size_limit_strongest_wins(tmp_path, clamd_small, sink):
    raw = case("B26-instream-size-limit.eml")
    with proxy(tmp_path, clamd_small, sink.upstream, "action = strip\n") as hp:
        err, _ = send(hp, raw)
    # strip takes the EICAR part; the oversized remainder is unscannable: reject (552).
    assert err is not None and err.smtp_code in (552, 554), err
    assert sink.messages == []
    with proxy(tmp_path, clamd_small, sink.upstream) as hp:
        err, _ = send(hp, raw)
    assert err is not None and err.smtp_code == 554 and EICAR_NAME.encode() in err.smtp_error
    # the reply names each finding: the infected part and the one over the size limit
    assert b'part 1.3 "eicar.com": infected' in err.smtp_error
    assert b'part 1.2 "filler.bin": unscannable (size-limit' in err.smtp_error


# -- actions --------------------------------------------------------------------------

MULTI = (b"From: s@example.com\r\nTo: r@example.net\r\nSubject: actions\r\nMIME-Version: 1.0\r\n"
         b"Content-Type: multipart/mixed; boundary=\"xx\"\r\n\r\npreamble\r\n"
         b"--xx\r\nContent-Type: text/plain\r\n\r\nkeep me   exactly\r\n\r\n"
         b"--xx\r\nContent-Type: application/octet-stream; name=\"e.com\"\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\n"
         + __import__("base64").encodebytes(EICAR).replace(b"\n", b"\r\n")
         + b"\r\n--xx\r\nContent-Type: application/pdf; name=\"clean.pdf\"\r\n"
         b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJeLjz9MK\r\n--xx--\r\nepilogue\r\n")


@pytest.mark.parametrize("action", ["strip", "replace", "quarantine"])
def test_rewriting_actions_keep_clean_parts_identical(tmp_path, clamd, sink, action):
    with proxy(tmp_path, clamd, sink.upstream, "action = %s\n" % action) as hp:
        err, _ = send(hp, MULTI)
    assert err is None
    content, status = stored(sink.messages[0][2])
    assert EICAR_NAME in status and {"strip": "removed", "replace": "replaced",
                                     "quarantine": "quarantined"}[action] in status
    head, rest = MULTI.split(b"--xx\r\nContent-Type: application/octet-stream", 1)
    tail = b"\r\n--xx\r\nContent-Type: application/pdf" + rest.split(
        b"\r\n--xx\r\nContent-Type: application/pdf", 1)[1]
    assert content.startswith(head) and content.endswith(tail)      # byte-identical
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert not msg.defects
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain", "application/pdf"]
    note = parts[1].get_content()
    assert EICAR_NAME in note and "1.2" in note and "e.com" in note
    qdir = os.path.join(str(tmp_path), "quarantine")
    entries = [e for e in os.listdir(qdir) if not e.startswith(".")]
    if action == "quarantine":
        assert len(entries) == 1 and entries[0] in note
    else:
        assert entries == [] or action != "quarantine"


def test_whole_body_replaced_for_single_part(tmp_path, clamd, sink):
    msg = b"Subject: plain\r\nContent-Type: text/plain\r\n\r\n" + EICAR + b"\r\n"
    with proxy(tmp_path, clamd, sink.upstream, "action = replace\n") as hp:
        err, _ = send(hp, msg)
    content, status = stored(sink.messages[0][2])
    assert EICAR not in content and b"Subject: plain\r\n" in content
    m = email.message_from_bytes(content, policy=email.policy.default)
    assert m.get_content_type() == "text/plain" and EICAR_NAME in m.get_content()


def test_discard_and_pass(tmp_path, clamd, sink):
    v = b"Subject: v\r\n\r\n" + EICAR + b"\r\n"
    with proxy(tmp_path, clamd, sink.upstream, "action = discard\n") as hp:
        err, _ = send(hp, v)
    assert err is None and sink.messages == []
    with proxy(tmp_path, clamd, sink.upstream, "action = pass\n") as hp:
        err, _ = send(hp, v)
    content, status = stored(sink.messages[0][2])
    assert content == v and EICAR_NAME in status and "passed" in status


def test_forged_virus_headers_stay_below_ours(tmp_path, clamd, sink):
    """A sender's own X-Virus-* headers are delivered (clean mail goes out
    byte for byte) but ours are the first occurrence, which is the one
    downstream filters must read."""
    forged = (b"X-Virus-Status: Clean\r\nX-Virus-Scanned: virusgw on trusted.example\r\n"
              b"Subject: v\r\n\r\n" + EICAR + b"\r\n")
    with proxy(tmp_path, clamd, sink.upstream, "action = pass\n") as hp:
        err, _ = send(hp, forged)
    assert err is None
    body = sink.messages[0][2]
    content, status = stored(body)
    assert content == forged and EICAR_NAME in status
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert msg.get_all("X-Virus-Status")[0].startswith("Infected (%s)" % EICAR_NAME)
    assert msg.get_all("X-Virus-Status")[1] == "Clean"
    assert msg["X-Virus-Scanned"] != "virusgw on trusted.example"


def test_direction_overrides(tmp_path, clamd, sink):
    v = b"Subject: v\r\n\r\n" + EICAR + b"\r\n"
    text = ("action = reject\n[[outbound]]\naction = pass\n[networks]\ninside = 127.0.0.1/32\n")
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        assert send(hp, v)[0] is None                           # 127.0.0.1: outbound: pass
        d = Dialogue(hp[0], hp[1], source="127.0.0.2")          # outside: inbound: reject
        d.reply()
        d.send(b"HELO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(stuff(v))
        assert d.reply()[0] == 554
        d.close()
    assert len(sink.messages) == 1


# -- relay control --------------------------------------------------------------------

def test_relay_control_from_outside(tmp_path, clamd, sink):
    text = "[networks]\ninside = 127.0.0.1/32\n"
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\n"
                  b"RCPT TO:<r@example.org>\r\nRCPT TO:<r%example.org@example.net>\r\n"
                  b"RCPT TO:<r!x@example.net>\r\nRCPT TO:<\"r@example.org\"@example.net>\r\n"
                  b"RCPT TO:<@example.net:r@example.org>\r\nRCPT TO:<@x.example:ok@EXAMPLE.NET.>\r\n"
                  b"DATA\r\n" + stuff(CLEAN) + b"QUIT\r\n")
        greeting, replies = raw_session(hp, stream, source="127.0.0.2")
        # and the same recipients from inside are relayed
        greeting, inside_replies = raw_session(hp, stream.replace(b"ok@EXAMPLE", b"ok2@EXAMPLE"))
    assert [c for c, _ in replies] == [250, 250, 550, 550, 550, 550, 550, 250, 354, 250, 221]
    assert sink.messages[0][1] == ["ok@EXAMPLE.NET"]       # route and trailing dot dropped
    assert [c for c, _ in inside_replies][:8] == [250, 250, 250, 250, 250, 250, 250, 250]


def test_relay_probing_ends_with_421_after_max_errors(tmp_path, clamd, sink):
    """Relay denials count toward max_errors (Postfix's smtpd_hard_error_limit)."""
    text = "max_errors = 3\n[networks]\ninside = 127.0.0.1/32\n"
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\n"
                  b"RCPT TO:<a@example.org>\r\nRCPT TO:<b%example.org@example.net>\r\n"
                  b"RCPT TO:<c@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        greeting, replies = raw_session(hp, stream, source="127.0.0.2")
    assert [c for c, _ in replies] == [250, 250, 550, 550, 421]
    assert "4.7.0" in replies[-1][1][0]
    assert sink.messages == []


def test_xforward_sent_when_offered(tmp_path, clamd):
    with Sink(xforward=True) as sink:
        with proxy(tmp_path, clamd, sink.upstream) as hp:
            d = Dialogue(hp[0], hp[1], source="127.0.0.3")
            d.reply()
            d.send(b"EHLO c.example\r\n")
            code, lines = d.reply()
            d.send(b"QUIT\r\n")
            d.reply()
            d.close()
    assert code == 250 and not any("XFORWARD" in l for l in lines)
    assert len(sink.xforward_seen) == 1
    assert "ADDR=127.0.0.3" in sink.xforward_seen[0] and "HELO=c.example" in sink.xforward_seen[0]


def test_xclient_sent_when_offered_and_session_restarted(tmp_path, clamd):
    with Sink(xclient=True) as sink:
        with proxy(tmp_path, clamd, sink.upstream) as hp:
            d = Dialogue(hp[0], hp[1], source="127.0.0.3")
            d.reply()
            d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\n"
                   b"DATA\r\n")
            code, lines = d.reply()
            assert [d.reply()[0] for _ in range(3)] == [250, 250, 354]
            d.send(stuff(CLEAN) + b"QUIT\r\n")
            assert [d.reply()[0] for _ in range(2)] == [250, 221]
            d.close()
    assert code == 250 and not any("XCLIENT" in l for l in lines)
    assert len(sink.xclient_seen) == 1 and "ADDR=127.0.0.3" in sink.xclient_seen[0]
    assert sink.ehlo_seen == ["c.example", "c.example"]        # EHLO again after XCLIENT's 220
    assert len(sink.messages) == 1


def test_ipv6_client(tmp_path, clamd, sink):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with proxy(tmp_path, clamd, sink.upstream, host="::1") as hp:
        err, _ = send(hp, CLEAN, rcpts=("r@example.org",))      # ::1/128 is inside by default
        log = log_text(tmp_path)
    assert err is None and sink.messages[0][1] == ["r@example.org"]
    assert "client=::1:" in log and "direction=outbound" in log


# -- failures --------------------------------------------------------------------------

def test_scanner_down_tempfail_and_reject(tmp_path, clamd, sink):
    dead = "unix:%s/nonexistent.sock" % tmp_path
    with proxy(tmp_path, clamd, sink.upstream, scanner=dead) as hp:
        err, _ = send(hp, CLEAN)
    assert err.smtp_code == 451 and b"4.7.0" in err.smtp_error
    with proxy(tmp_path, clamd, sink.upstream, scanner=dead,
               scanner_text="on_unavailable = reject\n") as hp:
        err, _ = send(hp, CLEAN)
    assert err.smtp_code == 554 and b"5.7.0" in err.smtp_error
    assert sink.messages == []


def test_scanner_hung_gives_on_unavailable(tmp_path, clamd, sink):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(50)                       # accepts (kernel backlog), never answers
    try:
        with proxy(tmp_path, clamd, sink.upstream, scanner="tcp:127.0.0.1:%d" % hung.getsockname()[1],
                   scanner_text="timeout = 1\n") as hp:
            err, _ = send(hp, CLEAN)
    finally:
        hung.close()
    assert err.smtp_code == 451 and sink.messages == []


def test_upstream_unreachable_421_at_ehlo(tmp_path, clamd):
    port = free_port()
    with proxy(tmp_path, clamd, "smtp:127.0.0.1:%d" % port) as hp:
        greeting, replies = raw_session(hp, b"EHLO c.example\r\nQUIT\r\n")
    assert greeting[0] == 220 and [c for c, _ in replies] == [421]
    assert "4.3.0" in replies[0][1][0]


def test_upstream_refusing_data_is_passed_through(tmp_path, clamd):
    with Sink(refuse_data=True) as sink:
        with proxy(tmp_path, clamd, sink.upstream) as hp:
            err, _ = send(hp, CLEAN)
    assert err.smtp_code == 554 and b"refused by sink" in err.smtp_error


def test_upstream_dying_mid_session(tmp_path, clamd):
    sink = Sink().start()
    try:
        with proxy(tmp_path, clamd, sink.upstream) as hp:
            d = Dialogue(*hp)
            d.reply()
            d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
            assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
            sink.stop()
            d.send(stuff(CLEAN))
            code, lines = d.reply()
            assert code == 421 and "nothing was delivered" in lines[0]
            assert d.reply()[0] is None
            d.close()
    finally:
        sink.stop()


def test_broken_config_421(tmp_path):
    conf = os.path.join(str(tmp_path), "bad.conf")
    logfile = os.path.join(str(tmp_path), "virusgw.log")
    with open(conf, "w") as f:
        f.write("[log]\nfile = %s\n[smtp]\naction = explode\nbogus = 1\n" % logfile)
    with activated(proxy_argv("virusgw-smtpproxy", conf)) as hp:
        d = Dialogue(*hp)
        code, lines = d.reply()
        assert code == 421 and "4.3.5" in lines[0] and d.reply()[0] is None
        d.close()
        log = log_text(tmp_path, until="answering 421")
    assert "'action'" in log and "'bogus'" in log


def test_idle_timeout(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream, "timeout = 1\n") as hp:
        d = Dialogue(*hp)
        assert d.reply()[0] == 220
        code, lines = d.reply()                   # waits; the proxy gives up after 1 s
        assert code == 421 and "4.4.2" in lines[0]
        d.close()


def test_long_lines_size_and_errors(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream, "max_message_size = 2000\nmax_errors = 3\n") as hp:
        stream = (b"EHLO c.example\r\nMAIL FROM:<s@example.com> SIZE=3000\r\n"
                  b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                  + b"x" * 1200 + b"\r\n.\r\n"
                  b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
                  + b"0123456789\r\n" * 300 + b".\r\n"
                  + b"N" * 5000 + b"\r\nBDAT 1 LAST\r\nXCLIENT ADDR=1.2.3.4\r\nNOOP\r\n")
        greeting, replies = raw_session(hp, stream)
    assert [c for c, _ in replies] == [250, 552, 250, 250, 354, 550, 250, 250, 354, 552,
                                       500, 502, 421]
    assert sink.messages == []


def test_dual_stack_listener_ipv4_client(tmp_path, clamd, sink):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with proxy(tmp_path, clamd, sink.upstream, "[networks]\ninside = 127.0.0.1/32\n",
               host="::") as hp:
        assert hp[0] == "127.0.0.1"
        err, _ = send(hp, CLEAN, rcpts=("r@example.org",))   # relaying: only if seen as inside
        log = log_text(tmp_path)
    assert err is None and sink.messages[0][1] == ["r@example.org"]
    assert "client=127.0.0.1:" in log and "direction=outbound" in log


def test_keepalive_noop_to_tcp_upstream_during_slow_data(tmp_path, clamd, sink):
    import time
    with proxy(tmp_path, clamd, sink.upstream, "keepalive = 1\n") as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        body = stuff(CLEAN)
        for i in range(3):                      # a slow client: the upstream must not time out
            d.send(body[i * 10:(i + 1) * 10])
            time.sleep(1.2)
        d.send(body[30:])
        assert d.reply()[0] == 250
        d.close()
    assert sink.noops >= 1
    assert stored(sink.messages[0][2])[0] == CLEAN


def test_deadline_applies_on_unavailable(tmp_path, clamd, sink):
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(50)
    try:
        with proxy(tmp_path, clamd, sink.upstream, "deadline = 1\n",
                   scanner="tcp:127.0.0.1:%d" % hung.getsockname()[1],
                   scanner_text="timeout = 60\n") as hp:
            err, _ = send(hp, CLEAN)
            log = log_text(tmp_path)
    finally:
        hung.close()
    assert err.smtp_code == 451 and b"scanner unavailable" in err.smtp_error
    assert b"127.0.0.1" not in err.smtp_error      # our clamd endpoints stay private
    assert sink.messages == []
    assert "deadline" in log                        # the why is in the log


# -- STARTTLS ----------------------------------------------------------------------------

@pytest.fixture
def cert(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("openssl"):
        pytest.skip("openssl (the command) is needed to make a test certificate")
    key, crt = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", crt, "-days", "2", "-subj", "/CN=gw.test.invalid"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return crt, key


def test_starttls_then_mail(tmp_path, clamd, sink, cert):
    import ssl
    text = "tls_cert = %s\ntls_key = %s\n" % cert
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        s = smtplib.SMTP(hp[0], hp[1], timeout=30)
        s.ehlo("c.example")
        assert s.has_extn("starttls")
        s.starttls(context=ctx)
        s.ehlo("c.example")
        assert not s.has_extn("starttls")
        s.sendmail("s@example.com", ["r@example.net"], CLEAN)
        s.quit()
        log = log_text(tmp_path)
    assert stored(sink.messages[0][2])[0] == CLEAN
    assert "tls=TLSv1." in log


def test_starttls_discards_pipelined_plaintext(tmp_path, clamd, sink, cert):
    import ssl
    text = "tls_cert = %s\ntls_key = %s\n" % cert
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(b"EHLO c.example\r\n")
        assert d.reply()[0] == 250
        d.send(b"STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")    # CVE-2011-0411 style
        assert d.reply()[0] == 220
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        d.s = ctx.wrap_socket(d.s)
        d.send(b"MAIL FROM:<s@example.com>\r\n")
        code, lines = d.reply()       # the injected MAIL was not taken: no EHLO yet since TLS
        assert code == 503 and "HELO" in lines[0]
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
        d.close()


def test_no_starttls_without_certificate(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        greeting, replies = raw_session(hp, b"EHLO c.example\r\nSTARTTLS\r\nQUIT\r\n")
    assert not any("STARTTLS" in l for l in replies[0][1])
    assert [c for c, _ in replies] == [250, 502, 221]


# -- more policy paths ------------------------------------------------------------------

def test_quarantine_full_is_a_temporary_refusal(tmp_path, clamd, sink):
    text = "action = quarantine\n[quarantine]\ndirectory = %s\nmax_total_size = 10\n" % (
        tmp_path / "q")
    os.makedirs(str(tmp_path / "q"), mode=0o750)
    with proxy(tmp_path, clamd, sink.upstream, text) as hp:
        err, _ = send(hp, MULTI)
    assert err is not None and err.smtp_code == 451 and sink.messages == []


def test_on_malformed_quarantine_holds(tmp_path, clamd, sink):
    harmless = case("B08a-duplicate-cte-base64-first.eml").replace(
        b"WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNU\r\n"
        b"LUZJTEUhJEgrSCo=", b"aGFybWxlc3M=")
    with proxy(tmp_path, clamd, sink.upstream, "on_malformed = quarantine\n") as hp:
        err, reply = send(hp, harmless)
    assert err is None and sink.messages == []
    qdir = os.path.join(str(tmp_path), "quarantine")
    (entry,) = [e for e in os.listdir(qdir) if not e.startswith(".")]
    meta = json.load(open(os.path.join(qdir, entry, "meta.json")))
    assert meta["reason"] == "malformed" and meta["rule"] == "smtp.outbound.on_malformed=quarantine"
    assert meta["scanner_version"] == clamd_version(clamd)
    assert open(os.path.join(qdir, entry, "content"), "rb").read() == harmless


def test_scan_encoded_skips_plain_messages(tmp_path, clamd, sink):
    dead = "unix:%s/nonexistent.sock" % tmp_path        # proves no scan was attempted
    with proxy(tmp_path, clamd, sink.upstream, "scan = encoded\n", scanner=dead) as hp:
        assert send(hp, CLEAN)[0] is None
        err, _ = send(hp, MULTI)                         # has encoded portions: scanned
    assert err.smtp_code == 451
    content, status = stored(sink.messages[0][2])
    assert content == CLEAN and "Unscanned" in status and len(sink.messages) == 1


@pytest.mark.skipif(not os.path.exists("/usr/bin/time"), reason="needs /usr/bin/time")
def test_memory_flat_for_a_large_message(tmp_path, clamd, sink):
    """Peak RSS of one proxy process for a ~27 MB message stays under 40 MB
    (the body is never held in memory).  Spawned directly on a socketpair
    so that its rusage can be read."""
    import base64
    import subprocess
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[smtp]\nupstream = %s\n"
                        "local_domains = example.net\n" % (clamd.unix_endpoint, sink.upstream))
    payload = os.urandom(20 * 1024 * 1024)
    msg = (b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
           b"--zz\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(payload).replace(b"\n", b"\r\n") + b"--zz--\r\n")
    a, b = socket.socketpair()
    # /usr/bin/time reports the proxy's own peak (a child forked straight
    # from this big test process would count our pages from before exec).
    rss_file = str(tmp_path / "rss")
    p = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss_file]
                         + proxy_argv("virusgw-smtpproxy", conf), stdin=b, stdout=b)
    b.close()
    try:
        d = Dialogue.__new__(Dialogue)
        d.s, d.buf = a, b""
        a.settimeout(60)
        assert d.reply()[0] == 220
        d.send(b"EHLO c.example\r\nMAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
        d.send(stuff(msg))
        assert d.reply()[0] == 250
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221
    finally:
        a.close()
        p.wait(timeout=60)
    peak_kb = int(open(rss_file).read().split()[-1])
    assert peak_kb < 40 * 1024, peak_kb
    assert stored(sink.messages[0][2])[0] == msg


def test_over_scanner_size_limit_on_unscannable(tmp_path, clamd_small, sink):
    import base64
    big = (b"Subject: big\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n"
           b"--q\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(b"harmless " * 5000).replace(b"\n", b"\r\n") + b"--q--\r\n")
    with proxy(tmp_path, clamd_small, sink.upstream) as hp:
        err, _ = send(hp, big)
    assert err is not None and err.smtp_code == 552 and b"5.3.4" in err.smtp_error
    assert sink.messages == []
    with proxy(tmp_path, clamd_small, sink.upstream, scanner_text="on_unscannable = pass\n") as hp:
        err, _ = send(hp, big)
    content, status = stored(sink.messages[0][2])
    assert err is None and content == big and "Unscanned" in status and "size-limit" in status


@pytest.mark.parametrize("upstream", ["sendmail:/nonexistent/sendmail -bs", "sendmail:/bin/false"])
def test_sendmail_upstream_that_cannot_start(tmp_path, clamd, upstream):
    with proxy(tmp_path, clamd, upstream) as hp:
        greeting, replies = raw_session(hp, b"EHLO c.example\r\nQUIT\r\n")
        log = log_text(tmp_path)
    assert greeting[0] == 220 and [c for c, _ in replies] == [421]
    assert "upstream unavailable" in log


@pytest.mark.parametrize("action", ["strip", "replace"])
def test_virus_in_top_level_header_never_leaves_with_a_notice(tmp_path, clamd, sink, action):
    """The rewritten message is scanned again: what a rewrite keeps (here a
    top-level header field) must be clean too, else the message is refused."""
    msg = b"Subject: hdr\r\nX-Payload: " + EICAR + b"\r\n\r\nclean body\r\n"
    with proxy(tmp_path, clamd, sink.upstream, "action = %s\n" % action) as hp:
        err, _ = send(hp, msg)
    assert err is not None and err.smtp_code == 554 and EICAR_NAME.encode() in err.smtp_error
    assert sink.messages == []


def test_invalid_utf8_path_under_smtputf8_refused(tmp_path, clamd, sink):
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        greeting, replies = raw_session(hp, b"EHLO c.example\r\nMAIL FROM:<s\xff@example.com> SMTPUTF8\r\n"
                                        b"MAIL FROM:<s@example.com> SMTPUTF8\r\n"
                                        b"RCPT TO:<r\xed\xa0\x80@example.net>\r\n"
                                        b"RCPT TO:<r\xc3\xbc@example.net>\r\nQUIT\r\n")
    assert [c for c, _ in replies] == [250, 501, 250, 501, 250, 221]


# -- the dialogue in the debug log ----------------------------------------------------

def test_debug_log_shows_dialogue_but_never_content_or_credentials(tmp_path, clamd, sink):
    """[log] level = debug (write_config's default): C>/S>/P>/U< lines,
    hostile bytes escaped, AUTH as its verb only, no message content (nor
    the content a client pipelines behind a refused DATA)."""
    secret = b"Q29udGVudFNlY3JldA"
    stream = (b"EHLO client.example.com\r\n"
              b"AUTH PLAIN AGFsaWNlAHMzY3IzdA==\r\n"
              b"NOOP \x1b[31m\xff\\x\r\n"
              b"DATA\r\n" + secret + b"-refused\r\nMAIL FROM:<no@x>\r\n.\r\nRSET\r\n"
              b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"
              b"Subject: t\r\n\r\n" + secret + b"-delivered\r\n.\r\nQUIT\r\n")
    with proxy(tmp_path, clamd, sink.upstream) as hp:
        _, replies = raw_session(hp, stream)
        log = log_text(tmp_path)
    assert [r[0] for r in replies][-3:] == [354, 250, 221]
    assert len(sink.messages) == 1
    for want in ("S> 220 ", "C> EHLO client.example.com", "S> 250-", "P> EHLO client.example.com",
                 "U< 250", "C> AUTH (arguments not shown)", "S> 502 ",
                 "C> NOOP \\x1b[31m\\xff\\x5cx", "P> MAIL FROM:<s@example.com>",
                 "P> RCPT TO:<r@example.net>", "P> DATA", "U< 354", "P> .", "S> 354 ",
                 "C> QUIT", "S> 221 ", "bytes after a refused DATA, not shown", "C> RSET"):
        assert want in log, want
    assert "AGFsaWNl" not in log and "\x1b" not in log and "no@x" not in log
    assert secret.decode() not in log
    assert "C> RCPT TO:<r@example.net>" in log      # logging resumes after the dot
    assert "to=r@example.net" in log and "from=s@example.com" in log


def test_dialogue_not_logged_above_debug(tmp_path, clamd, sink):
    logfile = os.path.join(str(tmp_path), "virusgw.log")
    with proxy(tmp_path, clamd, sink.upstream, "[log]\nfile = %s\nlevel = info\n" % logfile) as hp:
        err, _ = send(hp, CLEAN)
        log = log_text(tmp_path)
    assert err is None and "verdict=clean" in log
    for mark in ("C> ", "S> ", "P> ", "U< ", "DEBUG"):
        assert mark not in log, mark
