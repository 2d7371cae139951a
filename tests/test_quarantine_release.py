"""`virusgw quarantine release`: mail through a real aiosmtpd sink (and one
that refuses with 452), through exim spoken to as `sendmail:` (-bs on
stdin/stdout), a quarantined portion released as an attachment, an FTP file
written to --output; history, state and exit codes."""

import email
import email.policy
import glob
import io
import json
import os
import shutil
import tempfile

import pytest
from aiosmtpd.controller import Controller

from scanlib import release as rel
from scanlib.quarantine import Store
from tests.rig.activate import free_port, write_config
from tests.test_quarantine_cli import run_bin, run_runner

IN_CI = bool(os.environ.get("CI"))
MESSAGE = (b"From: Alice <alice@outside.example>\r\nTo: bob@inside.example\r\n"
           b"Subject: false positive\r\nMessage-ID: <fp@outside.example>\r\n\r\n"
           b"Hello Bob,\r\n.leading dot survives\r\n\r\n")


class Sink:
    """An aiosmtpd handler: keeps envelopes; refuses RCPT with `refuse`."""

    def __init__(self, refuse=None):
        self.refuse = refuse
        self.envelopes = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse:
            return self.refuse
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK %s" % address

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos),
                               envelope.original_content))
        return "250 2.0.0 queued as sink%d" % len(self.envelopes)


@pytest.fixture
def sink():
    handler = Sink()
    port = free_port()
    c = Controller(handler, hostname="127.0.0.1", port=port)
    c.start()
    handler.port = port
    try:
        yield handler
    finally:
        c.stop()


def setup_store(tmp_path, upstream, quarantine_keys=""):
    text = "[smtp]\nupstream = %s\n" % upstream
    if quarantine_keys:
        text += "[quarantine]\ndirectory = %s\n%s" % (tmp_path / "quarantine", quarantine_keys)
    conf = write_config(tmp_path, text)
    return conf, Store(str(tmp_path / "quarantine"))


def mail_entry(store, **extra):
    meta = {"protocol": "smtp", "direction": "inbound", "client": "192.0.2.9",
            "sender": "alice@outside.example",
            "recipients": ["bob@inside.example", "carol@inside.example"],
            "subject": "false positive", "message_id": "<fp@outside.example>",
            "viruses": ["VirusGW.Test.EICAR.UNOFFICIAL"], "action": "quarantine",
            "reason": "infected", "rule": "smtp.inbound.action=quarantine"}
    meta.update(extra)
    return store.add(io.BytesIO(MESSAGE), meta)


@pytest.mark.parametrize("run", [run_runner, run_bin], ids=["runner", "bin"])
def test_release_mail_through_sink(tmp_path, sink, run):
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % sink.port)
    qid = mail_entry(store)
    r = run(["quarantine", "release", "-c", conf, qid])
    assert r.code == 0, r
    assert "bob@inside.example: 250 2.1.5 OK bob@inside.example" in r.out
    assert "2 of 2 recipients accepted" in r.out
    assert len(sink.envelopes) == 1
    mail_from, rcpts, content = sink.envelopes[0]
    assert mail_from == "alice@outside.example"               # the original envelope sender
    assert rcpts == ["bob@inside.example", "carol@inside.example"]
    assert content == MESSAGE                                 # byte for byte, dot unstuffed again
    meta = store.get(qid)
    assert meta["state"] == "released"
    ev = meta["history"][-1]
    assert ev["event"] == "release" and ev["released"] is True
    import pwd
    assert ev["who"].split()[0] == pwd.getpwuid(os.getuid()).pw_name     # the user running the CLI
    assert ev["to"] == "smtp:127.0.0.1:%d" % sink.port and ev["when"].endswith("Z")
    assert ev["recipients"] == {"bob@inside.example": "250 2.1.5 OK bob@inside.example",
                                "carol@inside.example": "250 2.1.5 OK carol@inside.example"}
    assert ev["data"] == "250 2.0.0 queued as sink1"
    # list shows it as released (index updated with meta.json)
    r = run(["quarantine", "list", "-c", conf, "--json", "--state", "released"])
    assert [json.loads(x)["id"] for x in r.out.splitlines()] == [qid]

    # not twice without --force
    r = run(["quarantine", "release", "-c", conf, qid])
    assert r.code == 2 and "already released" in r.err, r
    assert len(sink.envelopes) == 1
    # --force, to another recipient
    r = run(["quarantine", "release", "-c", conf, qid, "--force", "--to", "admin@inside.example"])
    assert r.code == 0, r
    assert sink.envelopes[1][:2] == ("alice@outside.example", ["admin@inside.example"])
    assert len(store.get(qid)["history"]) == 2


def test_release_refused_with_452_is_exit_69_and_not_released(tmp_path, sink):
    sink.refuse = "452 4.2.2 Mailbox full"
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % sink.port)
    qid = mail_entry(store)
    for run in (run_runner, run_bin):
        r = run(["quarantine", "release", "-c", conf, qid])
        assert r.code == 69, r
        assert "bob@inside.example: 452 4.2.2 Mailbox full" in r.out
        assert r.err.startswith("virusgw: %s not released" % qid) and len(r.err.splitlines()) == 1
    assert sink.envelopes == []
    meta = store.get(qid)
    assert meta["state"] == "quarantined"
    assert [ev["released"] for ev in meta["history"]] == [False, False]
    assert meta["history"][0]["recipients"]["carol@inside.example"] == "452 4.2.2 Mailbox full"


def test_release_unreachable_upstream_is_exit_75(tmp_path):
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % free_port())
    qid = mail_entry(store)
    r = run_runner(["quarantine", "release", "-c", conf, qid])
    assert r.code == 75, r
    assert store.get(qid)["state"] == "quarantined"
    assert store.get(qid)["history"][0]["error"].startswith("cannot reach upstream")


def test_release_portion_as_attachment(tmp_path, sink):
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % sink.port,
                              "release_from = quarantine@gw.example\n")
    payload = bytes(range(256)) * 20
    qid = store.add(io.BytesIO(payload), {
        "protocol": "smtp", "direction": "inbound", "sender": "alice@outside.example",
        "recipients": ["bob@inside.example"], "subject": "report\r\nBcc: victim@x",
        "viruses": ["VirusGW.Test.EICAR.UNOFFICIAL"], "action": "quarantine",
        "portion": "1.2", "content_type": "application/x-msdownload",
        "filename": "../../etc/cron.d/evil.exe"})
    r = run_runner(["quarantine", "release", "-c", conf, qid])
    assert r.code == 0, r
    mail_from, rcpts, content = sink.envelopes[0]
    assert (mail_from, rcpts) == ("alice@outside.example", ["bob@inside.example"])
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert msg["To"] == "bob@inside.example"
    assert msg["From"] == "quarantine@gw.example"
    assert msg["Subject"].startswith("Released from quarantine: report")
    assert msg["Bcc"] is None                               # no header injection via the subject
    parts = list(msg.iter_attachments())
    assert len(parts) == 1
    assert parts[0].get_filename() == "evil.exe"
    assert parts[0].get_content_type() == "application/x-msdownload"
    assert parts[0].get_payload(decode=True) == payload
    assert qid in msg.get_body(("plain",)).get_content()
    assert store.get(qid)["state"] == "released"


@pytest.mark.parametrize("run", [run_runner, run_bin], ids=["runner", "bin"])
def test_release_ftp_file_to_output(tmp_path, run):
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:9")
    data = b"\x00binary\xff" * 1000
    qid = store.add(io.BytesIO(data), {"protocol": "ftp", "direction": "inbound",
                                      "ftp_user": "anonymous", "ftp_server": "192.0.2.1",
                                      "ftp_path": "/pub/x.exe", "filename": "x.exe",
                                      "viruses": ["Some.Virus"], "action": "quarantine"})
    r = run(["quarantine", "release", "-c", conf, qid])
    assert r.code == 2 and "--output" in r.err, r
    out = tmp_path / "restored.bin"
    out.write_bytes(b"precious")
    r = run(["quarantine", "release", "-c", conf, qid, "--output", str(out)])
    assert r.code == 2 and "exists" in r.err and out.read_bytes() == b"precious", r
    assert store.get(qid)["state"] == "quarantined"
    out2 = tmp_path / "new.bin"
    r = run(["quarantine", "release", "-c", conf, qid, "--output", str(out2)])
    assert r.code == 0 and out2.read_bytes() == data, r
    meta = store.get(qid)
    assert meta["state"] == "released"
    assert meta["history"][-1]["to"] == "file:%s" % out2 and meta["history"][-1]["released"]
    r = run(["quarantine", "release", "-c", conf, qid, "--output", str(out)])
    assert r.code == 2 and "already released" in r.err, r
    r = run(["quarantine", "release", "-c", conf, qid, "--output", str(out), "--force"])
    assert r.code == 0 and out.read_bytes() == data, r
    # mail is not released to a file
    mqid = mail_entry(store)
    r = run(["quarantine", "release", "-c", conf, mqid, "--output", str(tmp_path / "m")])
    assert r.code == 2 and "re-delivery" in r.err, r


EXIM = "/usr/sbin/exim4"
EXIM_CONF = """\
primary_hostname = virusgw.test
spool_directory = {d}/spool
log_file_path = {d}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
keep_environment =
acl_smtp_rcpt = acl_rcpt
acl_smtp_data = acl_data
begin acl
acl_rcpt:
  deny local_parts = refuse
       message = mailbox refused
  accept
acl_data:
  accept
begin routers
all:
  driver = accept
  transport = maildir
begin transports
maildir:
  driver = appendfile
  directory = {d}/mail
  maildir_format
  user = Debian-exim
  group = Debian-exim
  create_directory
  envelope_to_add
  return_path_add
"""


@pytest.fixture
def exim_dir():
    if not os.access(EXIM, os.X_OK) or os.getuid() != 0:
        msg = "exim4 (exim4-daemon-light) and root are needed for the sendmail: release test"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    # exim drops to Debian-exim: the folders must be reachable outside pytest's 0700 tmp
    d = tempfile.mkdtemp(prefix="virusgw-exim-")
    try:
        os.chmod(d, 0o755)
        for sub in ("spool", "mail", "log"):
            os.mkdir(os.path.join(d, sub))
            shutil.chown(os.path.join(d, sub), "Debian-exim", "Debian-exim")
        with open(os.path.join(d, "exim.conf"), "w") as f:
            f.write(EXIM_CONF.format(d=d))
        os.chmod(os.path.join(d, "exim.conf"), 0o644)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_release_through_sendmail_bs(tmp_path, exim_dir):
    upstream = "sendmail:%s -C %s/exim.conf -bs -odi" % (EXIM, exim_dir)
    conf, store = setup_store(tmp_path, upstream)
    qid = mail_entry(store, recipients=["bob@inside.example", "refuse@inside.example"])
    r = run_bin(["quarantine", "release", "-c", conf, qid])
    assert r.code == 0, r
    assert "refuse@inside.example: 550 mailbox refused" in r.out
    assert "1 of 2 recipients accepted" in r.out
    files = glob.glob(os.path.join(exim_dir, "mail", "new", "*"))
    assert len(files) == 1
    delivered = open(files[0], "rb").read()
    assert b"Return-path: <alice@outside.example>" in delivered
    assert b"Envelope-to: bob@inside.example\n" in delivered
    delivered = delivered.replace(b"\r\n", b"\n")
    assert b"\nSubject: false positive\nMessage-ID: <fp@outside.example>\n" in delivered
    assert delivered.endswith(b"\n\nHello Bob,\n.leading dot survives\n\n")  # exim adds Date:
    ev = store.get(qid)["history"][-1]
    assert ev["released"] and ev["to"] == upstream
    assert ev["recipients"]["bob@inside.example"].startswith("250")
    assert ev["recipients"]["refuse@inside.example"] == "550 mailbox refused"
    assert ev["data"].startswith("250 OK id=")


def test_sendmail_upstream_that_is_not_smtp_is_a_temporary_failure(tmp_path):
    conf, store = setup_store(tmp_path, "sendmail:/bin/true")
    qid = mail_entry(store)
    r = run_runner(["quarantine", "release", "-c", conf, qid])
    assert r.code == 75, r
    assert store.get(qid)["state"] == "quarantined"


def test_safe_filename():
    from hypothesis import given, strategies as st

    @given(st.text(max_size=300))
    def check(name):
        out = rel.safe_filename(name)
        assert out and "/" not in out and "\\" not in out and not out.startswith(".")
        assert len(out) <= 100 and out.isascii() and out.isprintable()
    check()
    assert rel.safe_filename("../../x/evil.exe") == "evil.exe"
    assert rel.safe_filename("..\\..\\win.ini") == "win.ini"
    assert rel.safe_filename("") == "attachment"


def test_addresses_that_could_inject_smtp_are_refused(tmp_path, sink):
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % sink.port)
    qid = mail_entry(store)
    for bad in ("x@y\r\nRCPT TO:<evil@z>", "a b@c", "<a@b>", "nobody", "a@b\x00"):
        r = run_runner(["quarantine", "release", "-c", conf, qid, "--to", bad])
        assert r.code == 2 and r.err.startswith("virusgw: --to: not a usable address"), (bad, r)
    # a meta.json someone tampered with: refused, recorded, nothing sent
    store.update(qid, lambda m: m.update(recipients=["ok@inside.example", "x@y\r\nDATA"]))
    r = run_runner(["quarantine", "release", "-c", conf, qid])
    assert r.code == 69 and "not a usable address" in r.err, r
    assert sink.envelopes == []
    assert store.get(qid)["state"] == "quarantined"
    for good in ("", "a@b.example"):
        assert rel.check_address(good, null_ok=True) == good


def test_whole_message_is_streamed_with_exact_smtp_framing(tmp_path, sink, monkeypatch):
    """Mail is streamed from its file in pieces (64 KiB; 16 bytes here, so
    that lines cross pieces within SMTP's line limit): a dot that starts a
    line is stuffed, one that starts a piece mid-line is not, a CRLF split
    between pieces stays one CRLF, bare LF becomes CRLF, a missing final
    CRLF is added."""
    monkeypatch.setattr(rel, "DATA_CHUNK", 16)
    conf, store = setup_store(tmp_path, "smtp:127.0.0.1:%d" % sink.port)
    body = (b"Subject: framing\n\n.starts with a dot\r\n"
            + b"A" * 16 + b".mid-line dot\r\n"
            + b"B" * 15 + b"\r\n"
            + b"..two dots\r\n.\r\nlast line without CRLF")
    qid = store.add(io.BytesIO(body), {"protocol": "smtp", "sender": "s@x.example",
                                      "recipients": ["r@y.example"], "action": "quarantine"})
    r = run_runner(["quarantine", "release", "-c", conf, qid])
    assert r.code == 0, r
    want = (b"Subject: framing\r\n\r\n.starts with a dot\r\n"
            + b"A" * 16 + b".mid-line dot\r\n"
            + b"B" * 15 + b"\r\n"
            + b"..two dots\r\n.\r\nlast line without CRLF\r\n")
    assert sink.envelopes[0][2] == want
