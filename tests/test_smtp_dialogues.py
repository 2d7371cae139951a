"""Dialogue transcripts: what a client sends (C:) and what the proxy
answers (S:, a prefix of the reply's last line), run against the real
proxy under socket activation with an aiosmtpd sink upstream.  One
scenario per transcript; they are meant to be read."""

import pytest

from tests.rig.activate import activated, proxy_argv, write_config
from tests.rig.smtp import Dialogue, Sink

pytestmark = pytest.mark.clamd

DIALOGUES = {
    "basics": """
        S: 220 gw.test ESMTP virusgw ready
        C: HELP
        S: 214 2.0.0 commands:
        C: MAIL FROM:<a@example.com>
        S: 503 5.5.1 send HELO or EHLO first
        C: EHLO client.example.com
        S: 250 SMTPUTF8
        C: VRFY someone
        S: 252 2.5.0
        C: NOOP
        S: 250 2.0.0 ok
        C: RSET
        S: 250 2.0.0 reset
        C: QUIT
        S: 221 2.0.0 bye
    """,
    "sequence": """
        S: 220
        C: EHLO client.example.com
        S: 250
        C: RCPT TO:<r@example.net>
        S: 503 5.5.1 need MAIL first
        C: DATA
        S: 503 5.5.1 need MAIL first
        C: MAIL FROM:<a@example.com>
        S: 250
        C: MAIL FROM:<a@example.com>
        S: 503 5.5.1 sender already given
        C: DATA
        S: 503 5.5.1 need RCPT before DATA
        C: RCPT TO:<r@example.net>
        S: 250
        C: DATA extra
        S: 501 5.5.4
        C: QUIT
        S: 221
    """,
    "not offered": """
        S: 220
        C: EHLO client.example.com
        S: 250
        C: BDAT 100 LAST
        S: 502 5.5.1 CHUNKING not offered; use DATA
        C: XCLIENT ADDR=192.0.2.1
        S: 502 5.5.1
        C: XFORWARD ADDR=192.0.2.1
        S: 502 5.5.1
        C: AUTH PLAIN AHVzZXIAcGFzcw==
        S: 502 5.5.1
        C: STARTTLS
        S: 502 5.5.1 STARTTLS not offered
        C: ETRN example.net
        S: 502 5.5.1
        C: cmd_quit
        S: 500 5.5.1 command unrecognized
        C: QUIT
        S: 221
    """,
    "relay from outside": """
        S: 220
        C: EHLO client.example.com
        S: 250
        C: MAIL FROM:<a@example.org>
        S: 250
        C: RCPT TO:<victim@example.org>
        S: 550 5.7.1 relaying denied
        C: RCPT TO:<victim%example.org@example.net>
        S: 550 5.7.1 local part
        C: RCPT TO:<@example.net:victim@example.org>
        S: 550 5.7.1 relaying denied
        C: RCPT TO:<user@Example.NET>
        S: 250
        C: RCPT TO:<postmaster>
        S: 250
        C: RCPT TO:<user@example.net >
        S: 501 5.1.3
        C: RCPT TO:<user@example.net> NOTIFY=NEVER
        S: 555 5.5.4 unsupported parameter
        C: RCPT TO:<us er@example.net>
        S: 501 5.1.3 bad recipient address syntax
        C: QUIT
        S: 221
    """,
}


def parse(text):
    steps = []
    for line in text.strip().splitlines():
        who, _, rest = line.strip().partition(": ")
        steps.append((who, rest))
    return steps


@pytest.mark.parametrize("name", sorted(DIALOGUES))
def test_dialogue(tmp_path, clamd, name):
    with Sink() as sink:
        conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[networks]\ninside = 127.0.0.1/32\n"
                            "[smtp]\nupstream = %s\nlocal_domains = example.net\nhostname = gw.test\n"
                            % (", ".join(clamd.endpoints), sink.upstream))
        with activated(proxy_argv("virusgw-smtpproxy", conf)) as hp:
            d = Dialogue(hp[0], hp[1], source="127.0.0.2")
            try:
                for who, text in parse(DIALOGUES[name]):
                    if who == "C":
                        d.send(text.encode() + b"\r\n")
                    else:
                        code, lines = d.reply()
                        assert code is not None, "connection closed, expected %r" % text
                        got = "%d %s" % (code, lines[-1][4:])
                        assert got.startswith(text), (name, text, lines)
            finally:
                d.close()
