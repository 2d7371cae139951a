"""SMTP test rig: an aiosmtpd sink that stores what it receives, a private
exim for `exim4 -C CONF -bs -odi` delivering into a maildir, and client
helpers (raw dialogue, swaks).

Sink(): Controller on a free loopback port; .messages is a list of
(mail_from, rcpt_tos, raw content bytes, extra) as received, .port,
.upstream = 'smtp:127.0.0.1:PORT'.  xforward=True makes it offer XFORWARD
and record what it was sent.

Exim(dir): writes a root-owned config (exim insists) and a maildir owned by
Debian-exim; .upstream is the sendmail: line for the proxy; .messages()
reads what was delivered.
"""

import os
import pwd
import shutil
import socket
import subprocess


from tests.rig.activate import free_port, wait_until

EXIM = shutil.which("exim4") or "/usr/sbin/exim4"
SWAKS = shutil.which("swaks") or "/usr/bin/swaks"


class Sink:
    def __init__(self, xforward=False, refuse_rcpt=(), refuse_data=False, xclient=False):
        self.messages = []
        self.xforward_seen = []
        self.xclient_seen = []
        self.xclient = xclient
        self.ehlo_seen = []
        self.noops = 0
        self.xforward = xforward
        self.refuse_rcpt = set(refuse_rcpt)
        self.refuse_data = refuse_data
        self.controller = None
        self.port = None

    @property
    def upstream(self):
        return "smtp:127.0.0.1:%d" % self.port

    def start(self):
        from aiosmtpd.controller import Controller
        from aiosmtpd.smtp import SMTP, syntax

        sink = self

        class Handler:
            async def handle_EHLO(self, server, session, envelope, hostname, responses):
                session.host_name = hostname
                sink.ehlo_seen.append(hostname)
                if sink.xforward:
                    responses.insert(len(responses) - 1, "250-XFORWARD NAME ADDR PORT PROTO HELO")
                if sink.xclient:
                    responses.insert(len(responses) - 1, "250-XCLIENT NAME ADDR PORT PROTO HELO")
                return responses

            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if address in sink.refuse_rcpt:
                    return "550 5.1.1 no such user"
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 OK"

            async def handle_DATA(self, server, session, envelope):
                if sink.refuse_data:
                    return "554 5.7.0 refused by sink"
                sink.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, dict(envelope.__dict__)))
                return "250 2.0.0 OK queued as %d" % len(sink.messages)

        class XSMTP(SMTP):
            async def smtp_NOOP(self, arg):
                sink.noops += 1
                await super().smtp_NOOP(arg)

            @syntax("XCLIENT attr=value ...")
            async def smtp_XCLIENT(self, arg):
                # Postfix's XCLIENT: the session restarts with a new greeting.
                sink.xclient_seen.append(arg)
                await self.push("220 sink ESMTP ready again")

            @syntax("XFORWARD attr=value ...")
            async def smtp_XFORWARD(self, arg):
                sink.xforward_seen.append(arg)
                await self.push("250 2.0.0 Ok")

        class XController(Controller):
            def factory(self):
                return XSMTP(self.handler, decode_data=False, enable_SMTPUTF8=True,
                             data_size_limit=200 * 1024 * 1024, ident="sink")

        self.port = free_port()
        self.controller = XController(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()
        return self

    def stop(self):
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


EXIM_CONF = """\
primary_hostname = exim.test.invalid
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
trusted_users = root
never_users =
keep_environment =
acl_smtp_rcpt = accept_all
acl_smtp_data = accept_all
received_header_text = Received: from ${{sender_rcvhost}} by ${{primary_hostname}} with ${{received_protocol}} id ${{message_exim_id}}
begin acl
accept_all:
  accept
begin routers
all:
  driver = accept
  transport = to_maildir
begin transports
to_maildir:
  driver = appendfile
  directory = {dir}/maildir
  maildir_format
  create_directory
  user = Debian-exim
  group = Debian-exim
  mode = 0644
"""


class Exim:
    """A private exim reached as `sendmail -bs`; delivers into a maildir.

    Its folders live in their own /tmp directory, not under pytest's temp
    root: pytest resets /tmp/pytest-of-USER to 0700 whenever a session
    starts (any concurrent run), and exim, running as Debian-exim after
    -C, must be able to reach its spool, log and maildir.  remove() (or
    the context manager) deletes it."""

    def __init__(self, directory=None):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="vgw-exim-")
        self.conf = os.path.join(self.dir, "exim.conf")

    def setup(self):
        pw = pwd.getpwnam("Debian-exim")
        os.chmod(self.dir, 0o755)
        for sub in ("spool", "log", "maildir"):
            p = os.path.join(self.dir, sub)
            os.makedirs(p, exist_ok=True)
            os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(p, 0o750)
        # Pre-create the logs as exim's user: the first exim (root until it
        # sees -C) would otherwise create them root-owned, and the next one,
        # running as Debian-exim, fails with "Unexpected log failure".
        for name in ("mainlog", "paniclog", "rejectlog"):
            p = os.path.join(self.dir, "log", name)
            open(p, "a").close()
            os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(p, 0o640)
        with open(self.conf, "w") as f:
            f.write(EXIM_CONF.format(dir=self.dir))
        os.chown(self.conf, 0, 0)
        os.chmod(self.conf, 0o644)
        return self

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.setup()

    def __exit__(self, *exc):
        self.remove()

    @property
    def upstream(self):
        return "sendmail:%s -C %s -bs -odi -oMa {client_addr}.{client_port}" % (EXIM, self.conf)

    def messages(self):
        out = []
        for sub in ("new", "cur"):
            p = os.path.join(self.dir, "maildir", sub)
            if os.path.isdir(p):
                for name in sorted(os.listdir(p)):
                    with open(os.path.join(p, name), "rb") as f:
                        out.append(f.read())
        return out


# -- clients -------------------------------------------------------------------

class Dialogue:
    """A raw SMTP client for byte-exact streams: send bytes, read replies."""

    def __init__(self, host, port, source=None, timeout=30):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.s = socket.socket(family, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        if source:
            self.s.bind((source, 0))
        self.s.connect((host, port))
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def reply(self):
        """(code, [lines]) of the next reply; (None, []) at EOF."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.s.recv(65536)
                if not data:
                    return (None, lines)
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return (int(line[:3]), lines)

    def replies(self):
        """Every reply until the server closes."""
        out = []
        while True:
            code, lines = self.reply()
            if code is None:
                return out
            out.append((code, lines))

    def close(self):
        self.s.close()


def swaks(host, port, *args, timeout=60):
    """Run swaks against host:port; (exit code, output)."""
    p = subprocess.run([SWAKS, "--server", "%s:%d" % (host, port), "--timeout", "30",
                        "--hide-informational"] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace")


def wait_for_messages(getter, n, timeout=10):
    return wait_until(lambda: len(getter()) >= n, timeout=timeout, what="%d message(s)" % n)


def stuff(content):
    """Dot-stuff an .eml for a DATA stream and terminate it."""
    from smtpproxy.datareader import stuff as _stuff
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return _stuff(content) + b".\r\n"


