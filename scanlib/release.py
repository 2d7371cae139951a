"""Release of quarantined items: mail re-delivered through the [smtp]
upstream, files written to a path.

Mail goes out with its original envelope sender to its original recipients
(or to the --to addresses), through `smtp:HOST:PORT` (smtplib) or
`sendmail:ARGV` (the program is spawned without a shell and spoken to in
SMTP on its stdin/stdout, as the proxy does with `sendmail -bs`; never
`sendmail -t`, which would take recipients from the headers).  A release
counts only when the upstream accepted the DATA after a 2xx for at least one
recipient.  Every recipient's answer is returned for the CLI to show and for
the entry's history.

A mail *portion* (an attachment the SMTP proxy quarantined) is released as a
new message to the original recipients that carries the portion as an
attachment; the file name shown is the sanitised original name (it is never
a path here either).

What this module does not do: decide who may release (file permissions do),
change the store (the CLI records the outcome), or import click.
"""

import os
import re
import shlex
import socket
import subprocess

TIMEOUT = 60


class ReleaseError(Exception):
    """Release failed.  .temporary: try again later (exit 75), else the
    upstream refused (exit 69).  .answers: what was said so far."""

    def __init__(self, message, temporary=False, answers=None):
        Exception.__init__(self, message)
        self.temporary = temporary
        self.answers = answers or {}


# -- talking SMTP to a spawned program ----------------------------------------------

class _PipeSock:
    """Just enough of a socket for smtplib over a child's stdin/stdout."""

    def __init__(self, argv, timeout):
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, close_fds=True,
                                     start_new_session=True)

    def sendall(self, data):
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as e:
            raise OSError("upstream program closed its input: %s" % e)

    def makefile(self, mode="rb"):
        return self.proc.stdout

    def close(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _smtp_class():
    import smtplib

    class PipeSMTP(smtplib.SMTP):
        """smtplib.SMTP whose connection is a spawned program's stdin/stdout."""

        def __init__(self, argv, timeout):
            self._argv = argv
            smtplib.SMTP.__init__(self, local_hostname=_hostname(),
                                  timeout=timeout)
            self.connect()

        def connect(self, host="localhost", port=0, source_address=None):
            self.sock = _PipeSock(self._argv, self.timeout)
            self.file = None
            code, msg = self.getreply()
            return code, msg

    return smtplib, PipeSMTP


def _text(code, msg):
    if isinstance(msg, bytes):
        msg = msg.decode("utf-8", "backslashreplace")
    return ("%d %s" % (code, " / ".join(str(msg).splitlines()))).strip()


def connect(upstream, client="127.0.0.1", timeout=TIMEOUT):
    """An smtplib.SMTP talking to the configured upstream.  Raises
    ReleaseError(temporary=True) when it cannot be reached or does not
    greet with 220."""
    smtplib, PipeSMTP = _smtp_class()
    try:
        if upstream.startswith("smtp:"):
            from scanlib.config import split_hostport
            host, port = split_hostport(upstream[5:], 25)
            s = smtplib.SMTP(timeout=timeout, local_hostname=_hostname())
            code, msg = s.connect(host, port)
        elif upstream.startswith("sendmail:"):
            argv = [a.replace("{client_addr}", client).replace("{client_port}", "0")
                    for a in shlex.split(upstream[9:])]
            s = PipeSMTP(argv, timeout)
            code, msg = 220, b""
        else:
            raise ReleaseError("unknown upstream %r" % upstream, temporary=True)
    except smtplib.SMTPConnectError as e:
        raise ReleaseError("upstream %s refused the connection: %s"
                           % (upstream, _text(e.smtp_code, e.smtp_error)))
    except (OSError, smtplib.SMTPException, ValueError) as e:
        raise ReleaseError("cannot reach upstream %s: %s" % (upstream, e), temporary=True)
    if code != 220:
        raise ReleaseError("upstream %s greeted with %s" % (upstream, _text(code, msg)),
                           temporary=code < 500)
    return s


def check_address(addr, null_ok=False):
    """A mailbox fit for MAIL FROM/RCPT TO: no controls, spaces or angle
    brackets (nothing that could end or extend an SMTP command), bounded,
    one @ domain part.  Raises ValueError."""
    if not isinstance(addr, str):
        raise ValueError("address is not text: %r" % (addr,))
    if addr == "" and null_ok:
        return addr
    if not 3 <= len(addr) <= 512 or "@" not in addr[1:-1] or \
            any(c in "<> \t\r\n\x00\x7f" or ord(c) < 32 for c in addr):
        raise ValueError("not a usable address: %r" % addr[:100])
    return addr


def deliver(upstream, sender, recipients, message, client="127.0.0.1", timeout=TIMEOUT):
    """Send `message` (bytes, or a binary file streamed from where it is) from `sender` to `recipients` through the
    upstream.  Returns {'mail': answer, 'recipients': {rcpt: answer},
    'data': answer, 'accepted': [rcpts]} when the upstream took the message;
    raises ReleaseError (with .answers) when it did not."""
    import smtplib
    answers = {"mail": None, "recipients": {}, "data": None, "accepted": []}
    try:
        check_address(sender, null_ok=True)
        for rcpt in recipients:
            check_address(rcpt)
    except ValueError as e:
        raise ReleaseError(str(e), answers=answers)
    s = connect(upstream, client, timeout)
    try:
        try:
            code, msg = s.ehlo()
            if not 200 <= code < 300:
                code, msg = s.helo()
                if not 200 <= code < 300:
                    raise ReleaseError("upstream refused HELO: %s" % _text(code, msg),
                                       temporary=400 <= code < 500, answers=answers)
            opts = []
            if s.does_esmtp and not _is_ascii(message) and s.has_extn("8bitmime"):
                opts.append("BODY=8BITMIME")
            if s.does_esmtp and not all(a.isascii() for a in [sender] + list(recipients)) \
                    and s.has_extn("smtputf8"):
                opts.append("SMTPUTF8")
            code, msg = s.mail(sender, opts)
            answers["mail"] = _text(code, msg)
            if not 200 <= code < 300:
                raise ReleaseError("upstream refused the sender <%s>: %s"
                                   % (sender, answers["mail"]), answers=answers)
            for rcpt in recipients:
                code, msg = s.rcpt(rcpt)
                answers["recipients"][rcpt] = _text(code, msg)
                if 200 <= code < 300:
                    answers["accepted"].append(rcpt)
            if not answers["accepted"]:
                s.rset()
                raise ReleaseError("upstream refused every recipient", answers=answers)
            if isinstance(message, (bytes, bytearray)):
                code, msg = s.data(bytes(message))
            else:
                code, msg = _data_from_file(s, message)
            answers["data"] = _text(code, msg)
        except smtplib.SMTPDataError as e:
            answers["data"] = _text(e.smtp_code, e.smtp_error)
            raise ReleaseError("upstream refused the message: %s" % answers["data"],
                               answers=answers)
        except UnicodeError:
            raise ReleaseError("upstream does not offer SMTPUTF8 for a non-ASCII address",
                               answers=answers)
        except smtplib.SMTPServerDisconnected as e:
            raise ReleaseError("upstream disconnected: %s" % e, temporary=True, answers=answers)
        except (OSError, smtplib.SMTPException) as e:
            raise ReleaseError("upstream failed: %s" % e, temporary=True, answers=answers)
        if not 200 <= code < 300:
            raise ReleaseError("upstream refused the message: %s" % answers["data"],
                               answers=answers)
        return answers
    finally:
        # exim answers QUIT ~200 ms late; the message is safe at the 250
        try:
            s.putcmd("quit")
        except (OSError, smtplib.SMTPException):
            pass
        try:
            s.close()
        except OSError:
            pass


# -- what is sent -----------------------------------------------------------------------

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


def safe_filename(name, default="attachment"):
    """A harmless file name for a header: the last path element of the
    original, odd characters replaced, no leading dots, bounded."""
    name = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _SAFE_NAME.sub("_", name).lstrip(".")[:100]
    return name or default


def portion_message(meta, content, sender_header, recipients):
    """A new message carrying one released portion as its attachment."""
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid
    msg = EmailMessage()
    msg["From"] = sender_header
    msg["To"] = ", ".join(recipients)
    subject = str(meta.get("subject") or "").replace("\r", " ").replace("\n", " ")[:200]
    msg["Subject"] = "Released from quarantine: %s" % (subject or "(no subject)")
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=sender_header.rsplit("@", 1)[-1] or None)
    lines = [
        "An administrator released this attachment from the virus quarantine.",
        "",
        "Quarantine ID: %s" % meta.get("id"),
        "Original sender: %s" % (meta.get("sender") or "<>"),
        "Original subject: %s" % (subject or "(none)"),
        "Original Message-ID: %s" % str(meta.get("message_id") or "(none)")[:200],
        "Part: %s" % str(meta.get("portion") or "")[:50],
        "Scanner finding: %s" % (", ".join(meta.get("viruses") or []) or "(none)"),
        "",
    ]
    msg.set_content("\n".join(lines))
    ctype = str(meta.get("content_type") or "application/octet-stream").lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", ctype) \
            or ctype.startswith(("multipart/", "message/")):
        ctype = "application/octet-stream"
    maintype, subtype = ctype.split("/", 1)
    msg.add_attachment(content, maintype=maintype, subtype=subtype,
                       filename=safe_filename(meta.get("filename")))
    from email.policy import SMTP
    return msg.as_bytes(policy=SMTP)


def _hostname():
    # gethostname, not getfqdn: no DNS lookup that could hang a release
    return socket.gethostname() or "localhost"


def default_from():
    return "postmaster@%s" % _hostname()


def _is_ascii(message, bufsize=1 << 16):
    """Bytes, or a binary file read through once and rewound."""
    if isinstance(message, (bytes, bytearray)):
        return message.isascii()
    pos = message.tell()
    try:
        while True:
            block = message.read(bufsize)
            if not block:
                return True
            if not block.isascii():
                return False
    finally:
        message.seek(pos)


DATA_CHUNK = 1 << 16


def _data_from_file(s, f, bufsize=None):
    """DATA with the message streamed from a binary file (memory stays
    flat): lines dot-stuffed, bare LF sent as CRLF, a missing final CRLF
    added, then the end-of-data dot.  Returns the upstream's final reply."""
    import smtplib
    bufsize = bufsize or DATA_CHUNK
    code, msg = s.docmd("data")
    if code != 354:
        raise smtplib.SMTPDataError(code, msg)
    out = bytearray()
    at_start = True          # the next chunk begins a line
    after_cr = False         # the last chunk ended in CR (its LF may come next)
    while True:
        chunk = f.readline(bufsize)
        if not chunk:
            break
        if at_start and chunk.startswith(b"."):
            out += b"."
        if chunk.endswith(b"\n") and not chunk.endswith(b"\r\n") \
                and not (chunk == b"\n" and after_cr):
            chunk = chunk[:-1] + b"\r\n"
        out += chunk
        at_start = chunk.endswith(b"\n")
        after_cr = chunk.endswith(b"\r")
        if len(out) >= bufsize:
            s.send(bytes(out))
            del out[:]
    if not (out or b"\r\n").endswith(b"\r\n") or (not out and not at_start):
        out += b"\r\n"
    out += b".\r\n"
    s.send(bytes(out))
    return s.getreply()


def mail_payload(meta, content_file, recipients, release_from=""):
    """What to send for a mail entry: the open content itself (streamed by
    deliver), or, for a portion, the bytes of a new message carrying it."""
    if meta.get("portion"):
        return portion_message(meta, content_file.read(), release_from or default_from(),
                               recipients)
    return content_file


def write_file(src, path, force=False):
    """Copy the open content `src` to `path`; O_EXCL unless force.  Returns
    the number of bytes written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    n = 0
    with os.fdopen(fd, "wb") as out:
        while True:
            block = src.read(1 << 16)
            if not block:
                break
            out.write(block)
            n += len(block)
        out.flush()
        os.fsync(out.fileno())
    return n
