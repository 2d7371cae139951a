"""The proxy in front of a real `sendmail -bs` (a private exim delivering
into a maildir), with smtplib and swaks as clients."""

import os
import shutil

import pytest

from tests.rig.activate import activated, proxy_argv, write_config
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.smtp import Dialogue, Exim, swaks, stuff, SWAKS, EXIM

CASES = os.path.join(os.path.dirname(__file__), "cases")
pytestmark = [pytest.mark.clamd,
              pytest.mark.skipif(not os.path.exists(EXIM), reason="exim4 not installed")]


@pytest.fixture
def exim(tmp_path):
    if os.geteuid() != 0:
        # exim insists on a root-owned -C config and a spool owned by Debian-exim
        pytest.skip("the private exim needs root to set up")
    with Exim() as e:
        yield e


def proxy(tmp_path, clamd, upstream, text=""):
    conf = write_config(tmp_path, "[scanner]\nclamd = %s\n[networks]\ninside = 127.0.0.1/32\n"
                        "[smtp]\nupstream = %s\nlocal_domains = example.net\n%s"
                        % (", ".join(clamd.endpoints), upstream, text))
    return activated(proxy_argv("virusgw-smtpproxy", conf))


def test_exim_clean_and_infected_and_real_client_address(tmp_path, clamd, exim):
    clean = b"From: s@example.com\r\nSubject: via exim\r\n\r\nhello\r\n..dot\r\n"
    with proxy(tmp_path, clamd, exim.upstream) as hp:
        d = Dialogue(hp[0], hp[1], source="127.0.0.2")
        assert d.reply()[0] == 220
        d.send(b"EHLO outside.example\r\n")
        code, ehlo = d.reply()
        assert code == 250 and "PIPELINING" in ehlo[-1] + "".join(ehlo)
        assert not any(k in l for l in ehlo for k in ("CHUNKING", "STARTTLS", "PIPECONNECT"))
        d.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.org>\r\nRCPT TO:<r@example.net>\r\n"
               b"DATA\r\n")
        assert [d.reply()[0] for _ in range(4)] == [250, 550, 250, 354]
        d.send(stuff(clean))
        code, lines = d.reply()
        assert code == 250 and "OK id=" in lines[-1] and "virusgw: Clean" in lines[0]
        d.send(b"MAIL FROM:<s@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        assert [d.reply()[0] for _ in range(3)] == [250, 250, 354]
        d.send(stuff(b"Subject: v\r\n\r\n" + EICAR + b"\r\n"))
        code, lines = d.reply()
        assert code == 554 and EICAR_NAME in lines[-1]
        d.send(b"QUIT\r\n")
        assert d.reply()[0] == 221          # ours, at once: exim's own QUIT reply is not awaited
        d.close()
    got = exim.messages()
    assert len(got) == 1
    msg = got[0]
    assert b"[127.0.0.2]" in msg.split(b"\n\n", 1)[0]    # -oMa: exim records the real client
    assert msg.endswith(b"Subject: via exim\n\nhello\n..dot\n")   # stuffed on the wire, not in content
    assert b"X-Virus-Status: Clean\n" in msg


def test_exim_b06(tmp_path, clamd, exim):
    with open(os.path.join(CASES, "B06-reject-then-next-transaction.smtp"), "rb") as f:
        stream = f.read()
    with proxy(tmp_path, clamd, exim.upstream) as hp:
        d = Dialogue(*hp)
        d.reply()
        d.send(stream)
        codes = [c for c, _ in d.replies()]
        d.close()
    assert codes == [250, 250, 250, 354, 554, 250, 250, 354, 250, 221]
    got = exim.messages()
    assert len(got) == 1 and b"clean second message" in got[0]


@pytest.mark.skipif(not os.path.exists(SWAKS), reason="swaks not installed")
def test_swaks_attachments(tmp_path, clamd, exim):
    virus = tmp_path / "eicar.com"
    virus.write_bytes(EICAR)
    harmless = tmp_path / "report.txt"
    harmless.write_bytes(b"quarterly numbers\n" * 50)
    with proxy(tmp_path, clamd, exim.upstream) as hp:
        rc, out = swaks(hp[0], hp[1], "--to", "r@example.net", "--from", "s@example.com",
                        "--attach", "@%s" % harmless)
        assert rc == 0, out
        assert "virusgw: Clean" in out
        rc, out = swaks(hp[0], hp[1], "--to", "r@example.net", "--from", "s@example.com",
                        "--attach", "@%s" % virus)
        assert rc != 0 and "554" in out and EICAR_NAME in out, out
    got = exim.messages()
    assert len(got) == 1 and b"report.txt" in got[0]
