"""Unit tests of the pure parts of the FTP proxy: address parsing, line
framing, the command table (every state x verb), reply building/parsing,
userhost policy, file-type sniffing and the FTP policy matrix."""

import ipaddress

import pytest
from hypothesis import given, strategies as st

from ftpproxy import addr as A
from ftpproxy import session as S
from ftpproxy.replies import reply, ReplyParser, ReplyError
from ftpproxy import upstream as U
from scanlib import filetype, net, policy
from scanlib.verdict import Clean, Infected, Unscannable


# -- PORT / EPRT / PASV / EPSV ---------------------------------------------------

@pytest.mark.parametrize("arg,expect", [
    ("192,0,2,10,195,80", ("192.0.2.10", 50000)),
    ("127,0,0,1,4,0", ("127.0.0.1", 1024)),
    (" 10,0,0,1,255,255 ", ("10.0.0.1", 65535)),
])
def test_parse_port_ok(arg, expect):
    a, p = A.parse_port(arg)
    assert (str(a), p) == expect


@pytest.mark.parametrize("arg", [
    "192,0,2,10,256,1",         # field > 255: refused, never wrapped (B29)
    "192,0,2,10,195", "192,0,2,10,195,80,1", "192,0,2,x,1,1", "1,2,3,4,-1,5",
    "", "1,2,3,4,0,0", "1000,0,0,1,4,0", "1,2,3,4,5,0006",
])
def test_parse_port_bad(arg):
    with pytest.raises(A.AddrError) as e:
        A.parse_port(arg)
    assert e.value.code == 501


@pytest.mark.parametrize("arg,expect", [
    ("|1|192.0.2.10|50000|", ("192.0.2.10", 50000)),
    ("|2|::1|1025|", ("::1", 1025)),
    ("!2!2001:db8::7!2000!", ("2001:db8::7", 2000)),
])
def test_parse_eprt_ok(arg, expect):
    a, p = A.parse_eprt(arg)
    assert (str(a), p) == expect


@pytest.mark.parametrize("arg,code", [
    ("|3|1.2.3.4|2000|", 522), ("|1|::1|2000|", 501), ("|2|1.2.3.4|2000|", 501),
    ("|1|1.2.3.4|0|", 501), ("|1|1.2.3.4|65536|", 501), ("|1|1.2.3.4|20x|", 501),
    ("1|1|1.2.3.4|2000|", 501), ("|1|1.2.3.4|2000", 501), ("|1|1.2.3.4|2000|x", 501),
    ("5152.3.4.5|2000|", 501), ("|2|fe80::1%eth0|2000|", 501), ("", 501),
])
def test_parse_eprt_bad(arg, code):
    with pytest.raises(A.AddrError) as e:
        A.parse_eprt(arg)
    assert e.value.code == code


def test_check_active_bounce_rules():
    client = "192.0.2.10"
    ip = ipaddress.ip_address
    assert A.check_active("PORT", ip("192.0.2.10"), 50000, client) is None
    assert A.check_active("PORT", ip("198.51.100.7"), 50000, client)[0] == 500
    assert A.check_active("PORT", ip("192.0.2.10"), 25, client)[0] == 500
    assert A.check_active("PORT", ip("192.0.2.10"), 1023, client)[0] == 500
    assert A.check_active("EPRT", ip("2001:db8::7"), 2000, client)[0] == 522
    # a dual-stack listener hands the client as an IPv4-mapped address
    assert A.check_active("PORT", ip("127.0.0.1"), 2000, "::ffff:127.0.0.1") is None
    assert A.check_active("EPRT", ip("::1"), 2000, "::1") is None
    assert A.check_active("EPRT", ip("::2"), 2000, "::1")[0] == 500


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
       st.integers(1, 65535))
def test_pasv_roundtrip(a, b, c, d, port):
    text = A.format_pasv("%d.%d.%d.%d" % (a, b, c, d), port)
    assert A.parse_pasv_reply(text) == port
    a2, p2 = A.parse_port(text[text.index("(") + 1:text.index(")")])
    assert (str(a2), p2) == ("%d.%d.%d.%d" % (a, b, c, d), port)


@given(st.integers(1, 65535))
def test_epsv_roundtrip(port):
    assert A.parse_epsv_reply(A.format_epsv(port)) == port


@pytest.mark.parametrize("text", ["Entering Passive Mode", "(1,2,3,4,300,1)",
                                  "(1,2,3,4,0,0)"])
def test_pasv_reply_bad(text):
    with pytest.raises(A.AddrError):
        A.parse_pasv_reply(text)


@pytest.mark.parametrize("text", ["(|||0|)", "(|||70000|)", "(||x|)", "no port", "(|!|5|)"])
def test_epsv_reply_bad(text):
    with pytest.raises(A.AddrError):
        A.parse_epsv_reply(text)


@given(st.text(max_size=60))
def test_address_parsers_never_crash(text):
    for fn in (A.parse_port, A.parse_eprt, A.parse_pasv_reply, A.parse_epsv_reply):
        try:
            fn(text)
        except A.AddrError:
            pass


# -- line framing ---------------------------------------------------------------

def feed_all(chunks, limit=S.MAX_LINE):
    r = S.LineReader(limit)
    out = []
    for c in chunks:
        out.extend(r.feed(c))
    return out


def test_lines_crlf_only():
    assert feed_all([b"USER a\r\nPASS b\r\n"]) == [("line", b"USER a"), ("line", b"PASS b")]
    # a bare LF or CR stays inside one line: never two commands (B32)
    assert feed_all([b"RETR a\nDELE b\r\n"]) == [("line", b"RETR a\nDELE b")]
    assert feed_all([b"RETR a\rDELE b\r\n"]) == [("line", b"RETR a\rDELE b")]
    assert feed_all([b"RETR a\r", b"\nNOOP\r\n"]) == [("line", b"RETR a"), ("line", b"NOOP")]


def test_telnet_iac_stripped():
    IAC, IP, DM = b"\xff", b"\xf4", b"\xf2"
    assert feed_all([IAC + IP + IAC + DM + b"ABOR\r\n"]) == [("line", b"ABOR")]
    assert feed_all([IAC + b"\xfb\x01" + b"NOOP\r\n"]) == [("line", b"NOOP")]  # WILL ECHO
    assert feed_all([b"RETR a" + IAC + IAC + b"b\r\n"]) == [("line", b"RETR a\xffb")]
    assert feed_all([IAC, IP, IAC, DM, b"AB", b"OR\r\n"]) == [("line", b"ABOR")]
    assert feed_all([IAC + b"\xfa\x18\x01" + IAC + b"\xf0NOOP\r\n"]) == [("line", b"NOOP")]


def test_too_long_drained_then_in_step():
    ev = feed_all([b"X" * 5000 + b"\r\nNOOP\r\n"], limit=100)
    assert ev == [("too-long", None), ("line", b"NOOP")]
    ev = feed_all([b"X" * 60] * 10 + [b"\r", b"\nNOOP\r\n"], limit=100)
    assert ev == [("too-long", None), ("line", b"NOOP")]
    assert feed_all([b"Y" * 100 + b"\r\n"], limit=100) == [("line", b"Y" * 100)]


_lines = st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"").replace(b"\xff", b"")),
                  max_size=8)


@given(_lines, st.data())
def test_framing_independent_of_chunking(lines, data):
    stream = b"".join(l + b"\r\n" for l in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    chunks, prev = [], 0
    for c in cuts + [len(stream)]:
        chunks.append(stream[prev:c])
        prev = c
    got = feed_all(chunks)
    # A line may itself end in CR, so CR CRLF: the reader cuts at the first CRLF;
    # either way what comes out never contains CRLF and joins back to the stream.
    assert all(k == "line" and b"\r\n" not in l for k, l in got)
    assert b"".join(l + b"\r\n" for _, l in got) == stream


@given(st.binary(max_size=3000))
def test_framing_never_crashes_and_bounds(data):
    r = S.LineReader(200)
    for kind, line in r.feed(data):
        assert kind in ("line", "too-long")
        if kind == "line":
            assert len(line) <= 200 and b"\r\n" not in line


@given(st.binary(max_size=200))
def test_parse_refuses_controls(line):
    try:
        verb, arg = S.parse(line)
    except S.CommandError as e:
        assert e.code in (500, 501)
        return
    assert b"\r" not in line and b"\n" not in line and b"\0" not in line
    assert verb.isalpha() and 3 <= len(verb) <= 4


@pytest.mark.parametrize("line", [b"RETR a.txt\rDELE important.txt", b"RETR a.txt\nDELE x",
                                  b"RETR a.txt\0DELE important.txt"])
def test_b32_control_characters_refused(line):
    s = S.Session("tcp", "127.0.0.1")
    s.state = S.READY
    a = s.handle(line)
    assert isinstance(a, S.Reply) and a.data.startswith(b"501 ")


# -- the command table: every state x verb -------------------------------------

ARGS = {"USER": b"anonymous", "PASS": b"x", "ACCT": b"a", "TYPE": b"I", "MODE": b"S",
        "STRU": b"F", "REST": b"10", "OPTS": b"UTF8 ON", "PORT": b"127,0,0,1,8,0",
        "EPRT": b"|1|127.0.0.1|2048|", "SITE": b"CHMOD 644 x", "EPSV": b""}


def line_for(verb):
    if verb in ARGS:
        return (verb.encode() + b" " + ARGS[verb]).rstrip()
    cmd = S.COMMANDS[verb]
    return verb.encode() + (b" x" if cmd.arg == S.REQ else b"")


def session_in(state, mode="tcp", data=None):
    s = S.Session(mode, "127.0.0.1", site_allow=["CHMOD"])
    s.state = state
    s.data = data
    if mode == "userhost" and state != S.INIT:
        s.target = ("ftp.example.com", 21)
    return s


@pytest.mark.parametrize("state", [S.INIT, S.AUTH, S.READY])
@pytest.mark.parametrize("verb", sorted(S.COMMANDS) + ["XYZ", "LPRT", "DELE", "SITE"])
def test_every_state_and_verb(state, verb):
    s = session_in(state, data="passive")
    a = s.handle(line_for(verb) if verb in S.COMMANDS else verb.encode())
    cmd = S.COMMANDS.get(verb)
    if cmd is None:
        assert isinstance(a, S.Reply) and a.data[:3] == b"500"
        return
    if state not in cmd.states:
        assert isinstance(a, S.Reply), (verb, state, a)
        assert a.data[:3] in (b"530", b"503")
        return
    expected = {"relay": S.Relay, "login": (S.Login, S.Reply), "quit": S.Reply,
                "local": S.Reply, "feat": S.Feat, "type": S.Reply, "mode": S.Reply,
                "stru": S.Reply, "rest": S.Reply, "abort": S.Abort,
                "opts": (S.Relay, S.Reply), "site": S.Relay, "passive": S.Passive,
                "active": S.Active, "transfer": (S.Transfer, S.Reply),
                "refuse": S.Reply}[cmd.kind]
    assert isinstance(a, expected), (verb, state, a)
    if cmd.kind == "refuse":
        assert a.data[:3] == b"502"
    if cmd.kind == "relay":
        assert a.line == line_for(verb)


def test_refused_and_filtered_verbs():
    s = session_in(S.READY)
    for line, code in [(b"AUTH TLS", b"502"), (b"PBSZ 0", b"502"), (b"PROT P", b"502"),
                       (b"CCC", b"502"), (b"ADAT x", b"502"), (b"MODE B", b"504"),
                       (b"MODE Z", b"504"), (b"STRU R", b"504"), (b"SITE EXEC ls", b"502"),
                       (b"SITE", b"501"), (b"STOU", b"502"), (b"TYPE E", b"504"),
                       (b"FOOBAR", b"500"), (b"XX", b"500"), (b"REIN", b"502"),
                       (b"RETR", b"501"), (b"CDUP x", b"501"), (b"REST abc", b"501"),
                       (b"OPTS FOO", b"501"), (b"EPSV 3", b"522")]:
        a = s.handle(line)
        assert isinstance(a, S.Reply) and a.data[:3] == code, (line, a)
    assert isinstance(s.handle(b"SITE chmod 644 x"), S.Relay)
    assert isinstance(s.handle(b"MODE S"), S.Reply)


def test_transfer_needs_data_mode_and_rest_rules():
    s = session_in(S.READY)
    assert s.handle(b"RETR a").data[:3] == b"425"
    s.data = "passive"
    t = s.handle(b"RETR a")
    assert isinstance(t, S.Transfer) and t.rest == 0
    assert s.handle(b"REST 34").data[:3] == b"350"
    t = s.handle(b"RETR a")
    assert isinstance(t, S.Transfer) and t.rest == 34
    s.transfer_done()
    assert s.rest == 0 and s.data is None
    # B36: REST before STOR or APPE is refused, and forgotten
    for verb in (b"STOR", b"APPE"):
        s.data = "passive"
        s.handle(b"REST 34")
        a = s.handle(verb + b" eicar.com")
        assert isinstance(a, S.Reply) and a.data[:3] == b"550"
        assert s.rest == 0
    s.handle(b"REST 34")
    assert s.handle(b"STOU").data[:3] == b"502"


def test_epsv_all_refuses_other_modes():
    s = session_in(S.READY)
    assert s.handle(b"EPSV ALL").data[:3] == b"200"
    assert s.handle(b"PASV").data[:3] == b"503"
    assert s.handle(b"PORT 127,0,0,1,8,0").data[:3] == b"503"
    assert isinstance(s.handle(b"EPSV"), S.Passive)


def test_b29_bounce_in_session():
    s = S.Session("tcp", "192.0.2.10")
    s.state = S.READY
    for line, code in [(b"PORT 198,51,100,7,0,25", b"500"), (b"EPRT |1|198.51.100.7|25|", b"500"),
                       (b"EPRT |2|2001:db8::7|25|", b"522"), (b"PORT 192,0,2,10,0,25", b"500"),
                       (b"PORT 192,0,2,10,256,1", b"501")]:
        a = s.handle(line)
        assert isinstance(a, S.Reply) and a.data[:3] == code, line
    a = s.handle(b"PORT 192,0,2,10,195,80")
    assert isinstance(a, S.Active) and a.port == 50000


def test_login_transitions_and_userhost():
    s = S.Session("userhost", "127.0.0.1")
    assert s.handle(b"USER anonymous").data[:3] == b"530"
    a = s.handle(b"USER anonymous@ftp.example.com:2121")
    assert isinstance(a, S.Login) and (a.host, a.port) == ("ftp.example.com", 2121)
    assert a.line == b"USER anonymous"
    a = s.handle(b"USER me@x@[::1]:21")
    assert isinstance(a, S.Login) and (a.host, a.port, a.line) == ("::1", 21, b"USER me@x")
    for bad in (b"USER a@bad host", b"USER a@h:99999", b"USER a@h:x", b"USER a@[::1",
                b"USER a@", b"USER @host", b"USER a@h\xff", b"USER a@-h"):
        r = s.handle(bad)
        assert isinstance(r, S.Reply) and r.data[:3] == b"530", bad
    s.target = ("ftp.example.com", 21)
    assert s.handle(b"USER a@other.example.com").data[:3] == b"530"
    s.upstream_reply("USER", 331)
    assert s.state == S.AUTH
    assert isinstance(s.handle(b"PASS x"), S.Relay)
    s.upstream_reply("PASS", 530)
    assert s.state == S.AUTH
    s.upstream_reply("PASS", 230)
    assert s.state == S.READY
    assert s.handle(b"USER again").data[:3] == b"503"


# -- replies --------------------------------------------------------------------

def test_reply_building_is_safe():
    assert reply(226, "a", "b") == b"226-a\r\n226 b\r\n"
    assert reply(550, "x\r\n550 forged") == b"550 x  550 forged\r\n"


@given(st.integers(100, 599), st.lists(st.text(max_size=30), min_size=1, max_size=5))
def test_reply_roundtrip(code, lines):
    raw = reply(code, *lines)
    p = ReplyParser()
    got = p.feed(raw)
    # a continuation line may itself look like a final line ('NNN ...'):
    # the reply then ends there, which is what every client reads too.
    assert got and got[0].code == code


def test_reply_parser_multiline_and_errors():
    p = ReplyParser()
    raw = b"230-Welcome\r\n 230 not the end\r\n230-still\r\n230 End\r\n"
    [r] = p.feed(raw)
    assert r.code == 230 and r.raw() == raw
    assert p.feed(b"150 ok\r\n226 done\r\n")[1].code == 226
    for bad in (b"hello\r\n", b"99 x\r\n", b"600 x\r\n", b"12a x\r\n"):
        with pytest.raises(ReplyError):
            ReplyParser().feed(bad)
    with pytest.raises(ReplyError):
        ReplyParser().feed(b"2" * 9000)


# -- userhost policy ------------------------------------------------------------

def test_parse_allowed():
    assert U.parse_allowed("ftp.example.com") == ("glob", "ftp.example.com", 21)
    assert U.parse_allowed("*.example.com:2121") == ("glob", "*.example.com", 2121)
    assert U.parse_allowed("192.0.2.0/24")[0::2] == ("net", 21)
    assert U.parse_allowed("[2001:db8::/32]:990")[2] == 990
    assert U.parse_allowed("2001:db8::1")[0] == "net"
    with pytest.raises(ValueError):
        U.parse_allowed("h:0")


def test_check_target_matrix():
    inside = net.Networks(["127.0.0.1/32", "10.0.0.0/8"])
    allowed = ["127.0.0.1:2121", "*.example.com", "10.0.0.0/8", "198.51.100.0/24:21"]
    ok = [("h", "127.0.0.1", 2121, "127.0.0.1"),             # inside client, allowed loopback
          ("ftp.example.com", "203.0.113.5", 21, "127.0.0.2"),
          ("x", "198.51.100.7", 21, "127.0.0.2"),
          ("x", "10.1.2.3", 21, "10.0.0.9")]
    bad = [("h", "127.0.0.1", 2121, "127.0.0.2"),            # outside client -> loopback
           ("h", "127.0.0.1", 21, "127.0.0.1"),              # port not named
           ("x", "10.1.2.3", 21, "127.0.0.2"),               # outside -> inside
           ("x", "169.254.1.1", 21, "127.0.0.2"),
           ("ftp.example.org", "203.0.113.5", 21, "127.0.0.1"),
           ("ftp.example.com", "203.0.113.5", 2121, "127.0.0.1"),
           ("x", "198.51.100.7", 2121, "127.0.0.1")]
    for name, a, port, client in ok:
        U.check_target(name, a, port, allowed, client, inside)
    for name, a, port, client in bad:
        with pytest.raises(U.Denied):
            U.check_target(name, a, port, allowed, client, inside)
    with pytest.raises(U.Denied):
        U.check_target("h", "127.0.0.1", 21, [], "127.0.0.1", inside)   # empty = nothing


# -- file types -----------------------------------------------------------------

@pytest.mark.parametrize("head,kind", [
    (b"MZ\x90\x00", "executable/pe"), (b"\x7fELF\x02", "executable/elf"),
    (b"#!/bin/sh\n", "executable/script"), (b"PK\x03\x04rest", "archive/zip"),
    (b"\x1f\x8b\x08", "archive/gzip"), (b"Rar!\x1a\x07\x00", "archive/rar"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "document/ole2"), (b"%PDF-1.7", "document/pdf"),
    (b"\x00" * 257 + b"ustar\x0000", "archive/tar"), (b"hello world", None), (b"", None),
    (b"GIF89a", None),
])
def test_sniff(head, kind):
    assert filetype.sniff(head) == kind


def test_may_skip():
    skip = [".txt", "gif"]
    assert filetype.may_skip("notes.TXT", b"just text", skip)
    assert filetype.may_skip(b"dir/a.gif", b"GIF89a", skip)
    assert not filetype.may_skip("eicar.txt", b"MZ\x90", skip)       # content wins
    assert not filetype.may_skip("a.zip.txt", b"PK\x03\x04", skip)
    assert not filetype.may_skip("a.exe", b"text", skip)
    assert not filetype.may_skip(".txt", b"text", skip)                  # no base name
    assert not filetype.may_skip("a.txt", b"text", [])
    # the whole file must be plain text: a real GIF (binary) is scanned
    assert not filetype.may_skip("a.gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00", skip)


@pytest.mark.parametrize("data,text", [
    (b"", True), (b"plain ASCII\r\nlines\tand tabs\x0c\n", True),
    ("caf\u00e9 \u2013 \u00fcber\n".encode("utf-8"), True),
    ("caf\u00e9 \u00fcber\n".encode("latin-1"), True),
    ("\u201cquoted\u201d \u20ac".encode("cp1252"), True),
    (b"\x1b[1mbold\x1b[0m\n", True),
    (b"a\x00b", False), (b"a\x01b", False), (b"a\x7fb", False), (b"a\x81b", False),
    (b"PK\x05\x06" + b"\x00" * 18, False), (b"GIF89a\x01\x00", False),
])
def test_is_text(data, text):
    assert filetype.is_text(data) is text


def _zip_after_text():
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.com", b"MZ" + bytes(range(256)) * 40)
    return b"Just a note.\n" * 60 + buf.getvalue()


@pytest.mark.parametrize("name,data,skipped", [
    ("note.txt", b"Just a note.\n" * 5000, True),                  # > one 512-byte head
    ("note.txt", b"Just a note.\n" * 5000 + b"\x00", False),       # one NUL at the end
    ("note.txt", _zip_after_text(), False),                         # the zip is at the end
    ("note.txt", b"#!/bin/sh\necho hi\n", False),                  # text, but a script
    ("note.com", b"Just a note.\n", False),                         # name not skipped
])
def test_may_skip_file_reads_the_whole(tmp_path, name, data, skipped):
    path = tmp_path / "f"
    path.write_bytes(data)
    with open(str(path), "rb") as f:
        f.seek(7)
        assert filetype.may_skip_file(name, f, [".txt"]) is skipped
        assert f.tell() == 7                                         # position untouched


@given(st.binary(max_size=600), st.binary(max_size=600))
def test_text_check_is_blockwise_exact(a, b):
    """Fed in blocks (UTF-8 sequences cut anywhere) or at once: same answer."""
    t = filetype.TextCheck()
    t.feed(a)
    t.feed(b)
    assert t.result == filetype.is_text(a + b)


# -- the FTP policy matrix ------------------------------------------------------

VERDICTS = {"clean": Clean(), "infected": Infected(["X"]),
            "size": Unscannable("size-limit"), "enc": Unscannable("encrypted"),
            "down": Unscannable("unavailable")}


@pytest.mark.parametrize("upload", [False, True])
@pytest.mark.parametrize("action", ["pass", "delete", "quarantine"])
@pytest.mark.parametrize("on_unscannable", ["reject", "quarantine", "pass"])
@pytest.mark.parametrize("on_unavailable", ["tempfail", "reject", "pass"])
def test_policy_matrix(upload, action, on_unscannable, on_unavailable):
    view = {"action": action}
    scanner = {"on_unscannable": on_unscannable, "on_unavailable": on_unavailable}
    d = {k: policy.ftp(v, view, scanner, upload) for k, v in VERDICTS.items()}
    assert d["clean"].action == "pass"
    assert d["infected"].action == action
    if action != "pass":
        assert d["infected"].code == (551 if upload else 550)
    for k in ("size", "enc"):
        want = {"reject": "reject", "quarantine": "quarantine", "pass": "pass"}[on_unscannable]
        assert d[k].action == want
        if want != "pass":
            assert d[k].code == ((552 if k == "size" else 551) if upload else 550)
    want = {"tempfail": ("tempfail", 451), "reject": ("reject", 550),
            "pass": ("pass", None)}[on_unavailable]
    assert (d["down"].action, d["down"].code) == want


@given(st.lists(st.binary(max_size=60), max_size=30), st.sampled_from(["userhost", "tcp", "command"]),
       st.sampled_from([S.INIT, S.AUTH, S.READY]))
def test_session_total_on_hostile_lines(lines, mode, state):
    """Any line in any state gives exactly one action, never an exception;
    a relayed line is exactly the client's line and never holds CR/LF/NUL."""
    s = S.Session(mode, "127.0.0.1", site_allow=["CHMOD"])
    s.state = state
    for line in lines:
        a = s.handle(line)
        assert a is not None
        if isinstance(a, S.Relay):
            assert a.line == line
            assert not any(c in line for c in (b"\r", b"\n", b"\0"))
            assert S.COMMANDS[a.verb].kind in ("relay", "site", "opts")
        if isinstance(a, S.Reply):
            assert a.data.endswith(b"\r\n") and a.data[:3].isdigit()
            assert a.data.count(b"\r\n") == 1 or a.data[3:4] == b"-"


# -- the upstream leg: replies answer commands one for one (real loopback sockets) -------

class _Server:
    """The server end of a loopback TCP connection to an Upstream: answers
    each command line it gets with the next scripted reply."""

    def __init__(self, script=()):
        import socket
        import threading
        lst = socket.socket()
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname(), timeout=5)
        self.sock, _ = lst.accept()
        lst.close()
        self.sock.settimeout(5)
        self.up = U.Upstream(c, timeout=5)
        self.got = []
        self.script = list(script)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        buf = b""
        try:
            while self.script:
                while b"\r\n" not in buf:
                    data = self.sock.recv(4096)
                    if not data:
                        return
                    buf += data
                line, buf = buf.split(b"\r\n", 1)
                self.got.append(line)
                self.sock.sendall(self.script.pop(0))
        except OSError:
            pass

    def unasked(self, data):
        """Send data unasked, and wait until the proxy's end can read it."""
        import select
        self.sock.sendall(data)
        assert select.select([self.up.sock], [], [], 5)[0]

    def close(self):
        self.up.close(quit=False)            # the script thread then sees EOF
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("extra", [b"226 unsolicited\r\n", b"22", b"226-multi\r\n"])
def test_upstream_unsolicited_reply_before_a_command(extra):
    srv = _Server([b"200 NOOP ok\r\n"])
    try:
        assert srv.up.command(b"NOOP").code == 200
        srv.unasked(extra)
        with pytest.raises(U.UpstreamError) as e:
            srv.up.send(b"EPSV")
        assert "unsolicited" in str(e.value)
        assert srv.got == [b"NOOP"]                 # the command was never sent
    finally:
        srv.close()


@pytest.mark.parametrize("answer,fatal", [
    (b"226 Transfer complete\r\n", True), (b"200 ok\r\n", True), (b"150 go\r\n", True),
    (b"425 no\r\n", True), (b"502 no EPSV\r\n", False)])
def test_upstream_epsv_answers(answer, fatal):
    """EPSV: 229, or 5xx (then PASV on IPv4); anything else is a protocol
    error.  (Here PASV is refused too, so a 5xx ends as an error reply.)"""
    srv = _Server([answer, b"500 no PASV either\r\n"])
    try:
        if fatal:
            with pytest.raises(U.UpstreamError):
                srv.up.open_data()
        else:
            dsock, err = srv.up.open_data()
            assert dsock is None and err.code == 500
            assert srv.got == [b"EPSV", b"PASV"]
    finally:
        srv.close()


@pytest.mark.parametrize("answer,fatal", [(b"226 stored\r\n", True), (b"350 more\r\n", True),
                                          (b"150 go\r\n", False), (b"550 no\r\n", False),
                                          (b"451 later\r\n", False)])
def test_upstream_transfer_command_answers(answer, fatal):
    srv = _Server([answer])
    try:
        if fatal:
            with pytest.raises(U.UpstreamError):
                srv.up.transfer_command(b"STOR x")
        else:
            assert srv.up.transfer_command(b"STOR x").code == int(answer[:3])
    finally:
        srv.close()


def test_upstream_doubles_iac_in_commands():
    """0xFF in a name reaches the server as IAC IAC (RFC 854, RFC 2640)."""
    srv = _Server([b"213 5\r\n"])
    try:
        srv.up.command(b"SIZE caf\xe9-\xff\xfe.bin")
        assert srv.got == [b"SIZE caf\xe9-\xff\xff\xfe.bin"]
    finally:
        srv.close()


def test_store_recent_copy(tmp_path):
    """Store.recent_copy finds an entry of the same bytes made recently,
    with matching meta, and nothing else."""
    import hashlib
    from scanlib.quarantine import Store
    store = Store(str(tmp_path / "q"))
    qid = store.add(str(_write(tmp_path / "a", b"same bytes")), {"protocol": "ftp"})
    store.add(str(_write(tmp_path / "b", b"other bytes")), {"protocol": "ftp"})
    sha = hashlib.sha256(b"same bytes").hexdigest()
    assert store.recent_copy(sha, 3600) == qid
    assert store.recent_copy(sha, 3600, match={"protocol": "ftp"}) == qid
    assert store.recent_copy(sha, 3600, match={"protocol": "smtp"}) is None
    assert store.recent_copy(hashlib.sha256(b"never").hexdigest(), 3600) is None
    assert store.recent_copy(sha, -1) is None            # nothing that recent


def _write(path, data):
    path.write_bytes(data)
    return path
