"""The sans-I/O session: every state x verb, relay control, EHLO offer,
parameters, error limit.  No sockets: an upstream is simulated by answering
each Relay the session asks for."""

import pytest
from hypothesis import given, strategies as st

from smtpproxy import session as S
from smtpproxy.address import BadAddress, domain_matches, parse_path, relay_allowed

UP_EHLO = ["mx.example.net Hello", "SIZE 1000000", "8BITMIME", "PIPELINING", "CHUNKING",
           "XFORWARD NAME ADDR PORT PROTO HELO", "STARTTLS", "AUTH PLAIN", "DSN",
           "ENHANCEDSTATUSCODES", "SMTPUTF8", "BINARYMIME"]


def drive(sess, action, answer=lambda kind, cmd: (250, ["ok"])):
    """Run Relays against a fake upstream; returns (final action, relayed commands)."""
    sent = []
    while isinstance(action, S.Relay):
        sent.append(action.command)
        code, lines = answer(action.kind, action.command)
        action = sess.upstream(action.kind, code, lines)
    return action, sent


def up(kind, cmd):
    if kind == "EHLO":
        return 250, UP_EHLO
    return 250, ["2.0.0 ok"]


def new(inside=False, **kw):
    return S.Session(S.Settings(hostname="gw.example.org", inside=inside,
                                local_domains=["example.net", ".sub.example.com"],
                                max_size=50000, client_addr="192.0.2.7", client_port=4321,
                                **kw))


def cmd(sess, line, answer=up):
    return drive(sess, sess.line(line.encode() + b"\r\n"), answer)


def ready(inside=False, **kw):
    s = new(inside, **kw)
    cmd(s, "EHLO client.example.com")
    return s


def test_ehlo_offers_intersection_and_forwards_client():
    s = new()
    action, sent = cmd(s, "EHLO client.example.com")
    text = action.data.decode()
    assert text.startswith("250-gw.example.org hello client.example.com\r\n")
    for k in ("PIPELINING", "SIZE 50000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"):
        assert "\r\n250-%s\r\n" % k in text or "\r\n250 %s\r\n" % k in text, k
    for k in ("CHUNKING", "XFORWARD", "STARTTLS", "AUTH", "BINARYMIME", "XCLIENT"):
        assert k not in text
    assert sent[0] == b"EHLO client.example.com\r\n"
    assert sent[1] == b"XFORWARD ADDR=192.0.2.7 PORT=4321 HELO=client.example.com PROTO=ESMTP\r\n"


def test_ehlo_without_upstream_extensions_offers_pipelining_and_our_size():
    s = new()
    action, _ = cmd(s, "EHLO c.example", lambda k, c: (250, ["mx"]))
    assert action.data == (b"250-gw.example.org hello c.example\r\n250-PIPELINING\r\n"
                           b"250 SIZE 50000\r\n")
    # SIZE= is checked against our limit but not passed to an upstream without SIZE.
    a, sent = cmd(s, "MAIL FROM:<a@b.example> SIZE=10", lambda k, c: (250, ["ok"]))
    assert a.data.startswith(b"250") and sent == [b"MAIL FROM:<a@b.example>\r\n"]
    assert cmd(s, "RSET")[0].data.startswith(b"250")
    assert cmd(s, "MAIL FROM:<a@b.example> SIZE=50001")[0].data.startswith(b"552 5.3.4")


@pytest.mark.parametrize("upstream, offered", [
    (None, "50000"), ("SIZE", "50000"), ("SIZE 0", "50000"), ("SIZE 1000000", "50000"),
    ("SIZE 50000", "50000"), ("SIZE 1234", "1234"), ("SIZE junk", "50000"),
])
def test_ehlo_size_is_ours_or_the_lower_upstream_limit(upstream, offered):
    s = new()
    lines = ["mx"] + ([upstream] if upstream else [])
    action, _ = cmd(s, "EHLO c.example", lambda k, c: (250, lines))
    text = action.data.decode()
    assert ("\r\n250 SIZE %s\r\n" % offered) in text or ("\r\n250-SIZE %s\r\n" % offered) in text
    assert s.size_limit == int(offered)


def test_upstream_refusing_ehlo_gets_helo():
    s = new()
    answers = {"EHLO": (502, ["no"]), "HELO": (250, ["mx"])}
    action, sent = cmd(s, "EHLO c.example", lambda k, c: answers[k])
    assert sent == [b"EHLO c.example\r\n", b"HELO c.example\r\n"]
    assert action.data.startswith(b"250")


def test_xclient_restarts_upstream_session():
    s = new()
    answers = {"EHLO": (250, ["mx", "XCLIENT ADDR NAME PORT HELO"]), "XCLIENT": (220, ["mx"]),
               "EHLO-AGAIN": (250, ["mx", "XCLIENT ADDR"])}
    action, sent = cmd(s, "EHLO c.example", lambda k, c: answers[k])
    assert sent == [b"EHLO c.example\r\n", b"XCLIENT ADDR=192.0.2.7 PORT=4321 HELO=c.example\r\n",
                    b"EHLO c.example\r\n"]
    assert action.data.startswith(b"250-gw.example.org")


STATES = {
    "start": lambda: new(),
    "ready": lambda: ready(),
    "mail": lambda: _with(ready(), "MAIL FROM:<a@example.com>"),
    "rcpt": lambda: _with(ready(), "MAIL FROM:<a@example.com>", "RCPT TO:<r@example.net>"),
}


def _with(s, *lines):
    for l in lines:
        a, _ = cmd(s, l)
        assert a.data[:1] == b"2", (l, a)
    return s


# (verb line, {state: expected reply code or 'relay'/'data'})
TABLE = [
    ("HELO c.example", {"start": 250, "ready": 250, "mail": 250, "rcpt": 250}),
    ("EHLO c.example", {"start": 250, "ready": 250, "mail": 250, "rcpt": 250}),
    ("MAIL FROM:<a@example.com>", {"start": 503, "ready": 250, "mail": 503, "rcpt": 503}),
    ("RCPT TO:<r@example.net>", {"start": 503, "ready": 503, "mail": 250, "rcpt": 250}),
    ("DATA", {"start": 503, "ready": 503, "mail": 503, "rcpt": "data"}),
    ("RSET", {"start": 250, "ready": 250, "mail": 250, "rcpt": 250}),
    ("NOOP", {"start": 250, "ready": 250, "mail": 250, "rcpt": 250}),
    ("HELP", {"start": 214, "ready": 214, "mail": 214, "rcpt": 214}),
    ("VRFY postmaster", {"start": 252, "ready": 252, "mail": 252, "rcpt": 252}),
    ("QUIT", {"start": 221, "ready": 221, "mail": 221, "rcpt": 221}),
    ("STARTTLS", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("BDAT 10 LAST", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("XCLIENT ADDR=1.2.3.4", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("XFORWARD ADDR=1.2.3.4", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("AUTH PLAIN AAAA", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("EXPN list", {"start": 502, "ready": 502, "mail": 502, "rcpt": 502}),
    ("FOO bar", {"start": 500, "ready": 500, "mail": 500, "rcpt": 500}),
    ("cmd_helo x", {"start": 500, "ready": 500, "mail": 500, "rcpt": 500}),
]


@pytest.mark.parametrize("line,expect", TABLE, ids=[t[0].split()[0] for t in TABLE])
@pytest.mark.parametrize("state", sorted(STATES))
def test_state_verb_table(state, line, expect):
    s = STATES[state]()
    action, _ = cmd(s, line)
    want = expect[state]
    if want == "data":
        assert isinstance(action, S.StartData)
    else:
        assert isinstance(action, S.Send), action
        assert int(action.data[:3]) == want, action.data
        assert action.close == (want in (221,))


def test_transaction_state_after_replies():
    s = ready()
    cmd(s, "MAIL FROM:<a@example.com>")
    cmd(s, "RCPT TO:<r1@example.net>")
    # a refused RCPT does not count
    a, _ = cmd(s, "RCPT TO:<r2@example.net>", lambda k, c: (550, ["5.1.1 no such user"]))
    assert a.data == b"550 5.1.1 no such user\r\n"
    assert [p.mailbox for p in s.recipients] == ["r1@example.net"]
    # RSET in a transaction goes upstream and clears it
    a, sent = cmd(s, "RSET")
    assert sent == [b"RSET\r\n"] and s.state == S.READY and not s.recipients


def test_relay_control_from_outside():
    s = ready(inside=False)
    cmd(s, "MAIL FROM:<a@example.com>")
    for rcpt, code in [("<r@example.net>", 250), ("<r@EXAMPLE.NET.>", 250),
                       ("<r@x.sub.example.com>", 250), ("<r@sub.example.com>", 550),
                       ("<r@example.org>", 550), ("<r%example.org@example.net>", 550),
                       ("<r!x@example.net>", 550), ('<"r@example.org"@example.net>', 550),
                       ("<@example.net:r@example.org>", 550), ("<@a.example,@b.example:r@example.net>", 250),
                       ("<r@[192.0.2.1]>", 550), ("<Postmaster>", 250), ("<r@example.net", 501),
                       ("r@example.net", 501), ("<r..x@example.net>", 501), ("<r@-x.example.net>", 501),
                       ("<>", 501)]:
        a, sent = cmd(s, "RCPT TO:" + rcpt)
        assert int(a.data[:3]) == code, (rcpt, a.data)
        if code == 250:
            assert b"@a.example" not in sent[0]          # source route dropped


def test_inside_client_may_relay():
    s = ready(inside=True)
    cmd(s, "MAIL FROM:<a@example.com>")
    a, sent = cmd(s, "RCPT TO:<r@example.org>")
    assert a.data.startswith(b"250") and sent == [b"RCPT TO:<r@example.org>\r\n"]


def test_mail_parameters():
    s = ready()
    a, sent = cmd(s, "MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME")
    assert sent == [b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME\r\n"]
    s = ready()
    assert cmd(s, "MAIL FROM:<a@example.com> SIZE=50001")[0].data.startswith(b"552 5.3.4")
    assert cmd(s, "MAIL FROM:<a@example.com> BODY=BINARYMIME")[0].data.startswith(b"555")
    assert cmd(s, "MAIL FROM:<a@example.com> FOO=1")[0].data.startswith(b"555")
    assert cmd(s, "MAIL FROM:<a@example.com> SIZE=1 SIZE=2")[0].data.startswith(b"501")
    a, sent = cmd(s, "MAIL FROM:<> RET=HDRS ENVID=x")
    assert sent == [b"MAIL FROM:<> RET=HDRS ENVID=x\r\n"]
    a, sent = cmd(s, "RCPT TO:<r@example.net> NOTIFY=NEVER")
    assert sent == [b"RCPT TO:<r@example.net> NOTIFY=NEVER\r\n"]


def test_smtputf8_only_with_parameter():
    s = ready()
    assert cmd(s, "MAIL FROM:<j\u00f6rg@example.com>")[0].data.startswith(b"501")
    a, sent = cmd(s, "MAIL FROM:<j\u00f6rg@example.com> SMTPUTF8")
    assert a.data.startswith(b"250")
    assert cmd(s, "RCPT TO:<\u00fc@example.net>")[0].data.startswith(b"250")


def test_helo_session_refuses_parameters():
    s = new()
    cmd(s, "HELO c.example")
    assert cmd(s, "MAIL FROM:<a@example.com> SIZE=1")[0].data.startswith(b"555")


def test_bad_lines_and_error_limit():
    s = new(max_errors=3)
    assert s.line(b"NOOP\n").data.startswith(b"500 5.5.2")
    assert s.line(b"NO\rOP\r\n").data.startswith(b"500 5.5.2")
    a = s.line(b"NOOP\0\r\n")
    assert a.data.startswith(b"421 4.7.0") and a.close


def test_replies_are_one_write_with_codes():
    s = ready()
    a, _ = cmd(s, "MAIL FROM:<a@example.com>", lambda k, c: (451, ["4.3.0 first", "second\x00\x1b"]))
    assert a.data == b"451-4.3.0 first\r\n451 second??\r\n"


@given(st.binary(max_size=80))
def test_any_line_gets_one_reply_or_relay(raw):
    s = ready()
    action = s.line(raw + b"\r\n")
    action, _ = drive(s, action, up)
    assert isinstance(action, (S.Send, S.StartData))
    if isinstance(action, S.Send):
        assert action.data.endswith(b"\r\n") and action.data[:1] in b"2345"


@given(st.text(max_size=60))
def test_parse_path_never_crashes(text):
    try:
        p = parse_path(text)
    except BadAddress:
        return
    assert text.startswith("<") and text.endswith(">")
    assert "\r" not in p.mailbox and "\n" not in p.mailbox and " " not in p.domain


def test_domain_matching():
    assert domain_matches("Example.NET.", ["example.net"])
    assert domain_matches("a.b.example.com", [".example.com"])
    assert not domain_matches("example.com", [".example.com"])
    assert not domain_matches("badexample.net", ["example.net"])
    assert relay_allowed(parse_path("<a@example.org>"), True, []) is None


def test_starttls_offered_only_when_configured_and_resets_session():
    s = new(tls=True)
    action, _ = cmd(s, "EHLO c.example")
    assert b"250-STARTTLS\r\n" in action.data or b"250 STARTTLS\r\n" in action.data
    assert isinstance(cmd(s, "STARTTLS")[0], S.StartTLS)
    assert cmd(s, "STARTTLS now")[0].data.startswith(b"501")
    cmd(s, "MAIL FROM:<a@example.com>")
    assert cmd(s, "STARTTLS")[0].data.startswith(b"503")
    s.tls_started()
    assert s.state == S.START and s.sender is None and not s.helo
    assert cmd(s, "MAIL FROM:<a@example.com>")[0].data.startswith(b"503")
    action, _ = cmd(s, "EHLO c.example")
    assert b"STARTTLS" not in action.data
    assert cmd(s, "STARTTLS")[0].data.startswith(b"503 5.5.1 TLS already active")
    assert b"STARTTLS" not in cmd(ready(), "EHLO c.example")[0].data


def test_recipient_limit():
    s = ready(max_recipients=2)
    cmd(s, "MAIL FROM:<a@example.com>")
    assert cmd(s, "RCPT TO:<r1@example.net>")[0].data.startswith(b"250")
    assert cmd(s, "RCPT TO:<r2@example.net>")[0].data.startswith(b"250")
    a, sent = cmd(s, "RCPT TO:<r3@example.net>")
    assert a.data.startswith(b"452 4.5.3") and sent == []


def test_relay_denials_count_toward_max_errors():
    """A relay prober is cut off like Postfix's smtpd_hard_error_limit:
    each 550 5.7.1 is an error; the max_errors-th one is 421 and a close."""
    s = ready(max_errors=3)
    cmd(s, "MAIL FROM:<a@example.com>")
    a, sent = cmd(s, "RCPT TO:<x@example.org>")
    assert a.data.startswith(b"550 5.7.1") and not a.close and sent == []
    a, _ = cmd(s, "RCPT TO:<x%y@example.net>")
    assert a.data.startswith(b"550 5.7.1") and not a.close
    a, _ = cmd(s, "RCPT TO:<x@example.org>")
    assert a.data.startswith(b"421 4.7.0") and a.close
    # from inside, the same recipients are relayed and no error is counted
    s = ready(inside=True, max_errors=2)
    cmd(s, "MAIL FROM:<a@example.com>")
    for _ in range(3):
        a, sent = cmd(s, "RCPT TO:<x@example.org>")
        assert a.data.startswith(b"250") and sent == [b"RCPT TO:<x@example.org>\r\n"]


@given(st.binary(max_size=2000))
def test_shown_dialogue_lines_are_printable_and_bounded(data):
    import re
    from smtpproxy.replies import MAX_SHOWN, shown
    out = shown(data + b"\r\n")
    assert all(" " <= c <= "~" for c in out)
    assert re.fullmatch(r"(?:[ -\[\]-~]|\\x[0-9a-f]{2})*(?:\.\.\.)?", out)
    assert len(out) <= 4 * MAX_SHOWN + 3
    plain = data.rstrip(b"\r\n")
    if len(plain) <= MAX_SHOWN and all(32 <= b <= 126 and b != 92 for b in plain):
        assert out == plain.decode("ascii")
