"""What the proxies really quarantine is listed and released with the CLI:
the SMTP proxy (a quarantined attachment, and a rejected message kept as a
blocked copy) and the FTP proxy (a quarantined download), each spawned by
systemd-socket-activate with the real clamd; releases go through the real
bin/virusgw to an aiosmtpd sink or to a file."""

import email
import email.policy
import ftplib
import json
import os
import random
import smtplib
import subprocess
import sys
from email.message import EmailMessage

import pytest

from tests.rig.activate import activated, proxy_argv, write_config
from tests.rig.clamd import EICAR, EICAR_NAME
from tests.rig.smtp import Sink

pytestmark = pytest.mark.clamd
VIRUSGW = os.path.join(os.path.dirname(sys.executable), "virusgw")


def cli(*args):
    p = subprocess.run([VIRUSGW, "quarantine"] + list(args), capture_output=True, timeout=120)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def listed(conf, *args):
    code, out, err = cli("list", "-c", conf, "--json", *args)
    assert code == 0, err
    return [json.loads(x) for x in out.splitlines()]


def with_attachment():
    m = EmailMessage()
    m["From"] = "alice@outside.example"
    m["To"] = "bob@example.net"
    m["Subject"] = "the invoice"
    m["Message-ID"] = "<inv1@outside.example>"
    m.set_content("Please see the attached file.\n")
    m.add_attachment(EICAR, maintype="application", subtype="octet-stream",
                     filename="invoice.com")
    return m.as_bytes(policy=email.policy.SMTP)


def test_smtp_proxy_entries_listed_and_released(tmp_path, clamd):
    qdir = tmp_path / "quarantine"
    qdir.mkdir()

    def config(name, text):
        d = tmp_path / name
        d.mkdir()
        return write_config(d, "[scanner]\nclamd = %s\ntimeout = 20\n[quarantine]\n"
                            "directory = %s\n[smtp]\nupstream = %s\nlocal_domains = example.net\n%s"
                            % (", ".join(clamd.endpoints), qdir, sink.upstream, text))
    with Sink() as sink:
        # inbound (loopback counts as outside here): the attachment is quarantined
        conf = config("in", "action = quarantine\n[networks]\ninside = 10.0.0.0/8\n")
        with activated(proxy_argv("virusgw-smtpproxy", conf)) as hp:
            s = smtplib.SMTP(hp[0], hp[1], timeout=30)
            s.ehlo("client.example.com")
            s.sendmail("alice@outside.example", ["bob@example.net"], with_attachment())
            s.quit()
        # outbound: a whole infected message is rejected, a blocked copy kept
        conf_out = config("out", "action = reject\n")
        with activated(proxy_argv("virusgw-smtpproxy", conf_out)) as hp:
            s = smtplib.SMTP(hp[0], hp[1], timeout=30)
            s.ehlo("client.example.com")
            body = b"Subject: plain\r\nFrom: carol@example.net\r\n\r\n" + EICAR + b"\r\n"
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("carol@example.net", ["dave@example.net"], body)
            assert e.value.smtp_code == 554
            s.quit()
        assert len(sink.messages) == 1                   # the one with the notice
        rows = listed(conf)
        assert len(rows) == 2
        held = listed(conf, "--state", "quarantined")
        assert len(held) == 1 and held[0]["protocol"] == "smtp"
        assert held[0]["sender"] == "alice@outside.example"
        assert held[0]["recipients"] == ["bob@example.net"]
        assert held[0]["viruses"] == [EICAR_NAME] and held[0]["portion"]
        blocked = listed(conf, "--state", "blocked", "--virus", "virusgw.test.*")
        assert len(blocked) == 1 and blocked[0]["sender"] == "carol@example.net"

        # the attachment: a new message to the original recipient carrying it
        code, out, err = cli("release", "-c", conf, held[0]["id"])
        assert code == 0, (out, err)
        mail_from, rcpts, content, _ = sink.messages[1]
        assert (mail_from, rcpts) == ("alice@outside.example", ["bob@example.net"])
        msg = email.message_from_bytes(content, policy=email.policy.default)
        [att] = list(msg.iter_attachments())
        assert att.get_payload(decode=True) == EICAR and att.get_filename() == "invoice.com"

        # the blocked whole message: re-delivered as it was (unstuffed bytes)
        code, out, err = cli("release", "-c", conf, blocked[0]["id"])
        assert code == 0, (out, err)
        mail_from, rcpts, content, _ = sink.messages[2]
        assert (mail_from, rcpts) == ("carol@example.net", ["dave@example.net"])
        assert EICAR in content and b"Subject: plain" in content
        assert {r["state"] for r in listed(conf)} == {"released"}


def test_ftp_proxy_entry_listed_and_released(tmp_path, clamd):
    from tests.rig.ftp import PyFtpd
    root = tmp_path / "ftproot"
    root.mkdir()
    (root / "eicar.com").write_bytes(EICAR)
    base = random.randrange(35000, 37800)
    with PyFtpd(root) as ftpd:
        conf = write_config(tmp_path, "[scanner]\nclamd = %s\ntimeout = 20\n"
                            "[networks]\ninside = 10.0.0.0/8\n"
                            "[ftp]\nupstream = tcp:127.0.0.1:%d\npassive_ports = %d-%d\n"
                            "action = quarantine\n"
                            % (", ".join(clamd.endpoints), ftpd.port, base, base + 99))
        with activated(proxy_argv("virusgw-ftpproxy", conf)) as hp:
            f = ftplib.FTP()
            f.connect(hp[0], hp[1], timeout=20)
            f.login("user", "secret")
            with pytest.raises(ftplib.error_perm) as e:
                f.retrbinary("RETR eicar.com", lambda b: None)
            f.quit()
    qid = str(e.value).split("Quarantined as ")[1].split()[0]
    rows = listed(conf, "--protocol", "ftp")
    assert [r["id"] for r in rows] == [qid]
    assert rows[0]["ftp_path"].endswith("eicar.com") and rows[0]["viruses"] == [EICAR_NAME]
    code, out, err = cli("list", "-c", conf)
    assert code == 0 and qid in out and "ftp/" in out
    out_path = tmp_path / "restored.com"
    code, out, err = cli("release", "-c", conf, qid, "--output", str(out_path))
    assert code == 0, (out, err)
    assert out_path.read_bytes() == EICAR
    assert listed(conf)[0]["released_to"] == "file:%s" % out_path
