"""The bench's clients and loads: SMTP messages, SMTP and FTP clients, the
greeting probe, and a minimal clamd client for the scan baselines.

The SMTP client speaks lockstep (no PIPELINING), one EHLO per connection,
TCP_NODELAY, like an MTA's delivery agent.  Every reply is checked; a load
reports its errors instead of raising, so one bad column does not end the
run.  Timings are wall clock (time.perf_counter).
"""

import asyncio
import base64
import ftplib
import hashlib
import os
import random
import socket
import threading
import time

SENDER = "sender@bench.test"
RCPT = "rcpt@bench.test"


class LoadError(Exception):
    pass


# -- messages ----------------------------------------------------------------

def stuff(content):
    """Dot-stuff CRLF content for DATA (RFC 5321 4.5.2) and end it."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    if content.startswith(b"."):
        content = b"." + content
    return content.replace(b"\r\n.", b"\r\n..") + b".\r\n"


def _headers(token, subject, extra=b""):
    return (b"From: Bench Sender <sender@bench.test>\r\n"
            b"To: <rcpt@bench.test>\r\n"
            b"Subject: " + subject.encode() + b"\r\n"
            b"Date: Thu, 03 Dec 2026 17:00:00 +0000\r\n"
            b"Message-ID: <" + token.encode() + b"@bench.test>\r\n"
            b"X-Bench-Id: " + token.encode() + b"\r\n"
            b"MIME-Version: 1.0\r\n" + extra)


_TEXT = (b"Hello,\r\n\r\nthis is a small benchmark message of the kind most mail is: a few\r\n"
         b"lines of plain text, one message per connection.\r\n\r\n") + b"".join(
    b"Line %02d of the body, some ordinary words to make it about a kilobyte.\r\n" % i
    for i in range(14)) + b"\r\n-- \r\nbench\r\n"


def small_mail(token):
    """About 1.5 KB of text/plain; returns the raw (unstuffed) content."""
    return (_headers(token, "bench " + token,
                     b"Content-Type: text/plain; charset=us-ascii\r\n"
                     b"Content-Transfer-Encoding: 7bit\r\n") + b"\r\n" + _TEXT)


def body_sha(content):
    """What the sink records: sha256 of everything after the first empty
    line (a gateway may prepend headers, never change the body)."""
    i = content.find(b"\r\n\r\n")
    return hashlib.sha256(content[i + 4:] + (b"" if content.endswith(b"\r\n") else b"\r\n")
                          ).hexdigest()


def pattern_bytes(size, seed=7):
    """size incompressible-looking bytes, cheap to make: a 1 MiB random
    block repeated (clamd and the gateways do not care that it repeats)."""
    rnd = random.Random(seed)
    block = rnd.randbytes(min(size, 1 << 20))
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


def attachment_mail(token, total_size, seed=None):
    """A multipart/mixed mail of about total_size bytes: a short text part
    and a base64 application/octet-stream attachment.  Returns
    (content, {'text': bytes, 'attachment': bytes}) so that the bench can
    scan each portion for the baseline."""
    if seed is None:        # distinct payloads: nothing may be cached anywhere
        seed = int.from_bytes(hashlib.sha256(token.encode()).digest()[:8], "big")
    raw = pattern_bytes(max(1, total_size * 57 // 78 - 2000), seed)
    enc = base64.encodebytes(raw).replace(b"\n", b"\r\n")
    text = b"The attachment is a benchmark payload.\r\n"
    boundary = b"=-=bench-boundary-" + token.encode() + b"=-="
    content = (_headers(token, "bench big " + token,
                        b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n")
               + b"\r\nThis is a multi-part message in MIME format.\r\n"
               + b"--" + boundary + b"\r\n"
               + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + text
               + b"--" + boundary + b"\r\n"
               + b"Content-Type: application/octet-stream; name=\"payload.bin\"\r\n"
               + b"Content-Transfer-Encoding: base64\r\n"
               + b"Content-Disposition: attachment; filename=\"payload.bin\"\r\n\r\n"
               + enc + b"--" + boundary + b"--\r\n")
    return content, {"text": text, "attachment": raw}


# -- SMTP client ---------------------------------------------------------------

async def _reply(reader, timeout):
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise LoadError("connection closed after %r" % b"".join(lines)[-200:])
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), b"".join(lines)
            except ValueError:
                raise LoadError("bad reply %r" % line[:200])


async def _expect(reader, want, what, timeout):
    try:
        code, text = await _reply(reader, timeout)
    except asyncio.TimeoutError:
        raise LoadError("%s: no reply within %ss" % (what, timeout))
    except LoadError as e:
        raise LoadError("%s: %s" % (what, e))
    if code // 100 != want:
        raise LoadError("%s: %s" % (what, text.decode("latin-1").strip()[:300]))
    return code


async def smtp_session(host, port, messages, timeout=120.0, steps=None):
    """One connection delivering messages (a list of stuffed DATA bytes).
    steps: optional dict to which per-step wall times are added."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, limit=1 << 16), timeout)
    try:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await _expect(reader, 2, "greeting", timeout)
        t = time.perf_counter()
        if steps is not None:
            steps["greeting"] = steps.get("greeting", 0.0) + t - t0
        seq = [(b"EHLO client.bench.test\r\n", 2, "ehlo")]
        for data in messages:
            seq += [(b"MAIL FROM:<%s>\r\n" % SENDER.encode(), 2, "mail"),
                    (b"RCPT TO:<%s>\r\n" % RCPT.encode(), 2, "rcpt"),
                    (b"DATA\r\n", 3, "data"),
                    (data, 2, "dot")]
        seq.append((b"QUIT\r\n", 2, "quit"))
        for payload, want, what in seq:
            writer.write(payload)
            if len(payload) > 65536:
                await writer.drain()
            await _expect(reader, want, what, timeout)
            if steps is not None:
                now = time.perf_counter()
                steps[what] = steps.get(what, 0.0) + now - t
                t = now
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


def run_mail_load(host, port, batches, clients, timeout=120.0, steps=None):
    """batches: list of lists of stuffed messages, one list per connection.
    clients: how many connections at once.  Returns
    {'wall': s, 'busy': s, 'messages': n, 'errors': [..], 'latencies': [...]}."""
    async def go():
        queue = list(enumerate(batches))
        errors, lat = [], []

        last = [0.0]

        async def worker():
            while queue:
                _i, batch = queue.pop()
                t = time.perf_counter()
                try:
                    await smtp_session(host, port, batch, timeout, steps)
                    last[0] = time.perf_counter()
                    lat.append(last[0] - t)
                except (LoadError, OSError, asyncio.TimeoutError) as e:
                    errors.append("%s: %s" % (type(e).__name__, e))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        # busy: until the last session that succeeded (a connection that
        # hangs until the timeout should not be counted as work done).
        return {"wall": time.perf_counter() - t0, "busy": max(0.0, last[0] - t0),
                "errors": errors, "latencies": lat,
                "messages": sum(len(b) for b in batches)}
    return asyncio.run(go())


def greeting_times(host, port, n, quit_line=b"QUIT\r\n", timeout=10.0):
    """n sequential connections: seconds from connect() to the first
    complete greeting line; then QUIT (answer awaited) and close."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            t0 = time.perf_counter()
            s.connect((host, port))
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise LoadError("closed before the greeting")
                buf += chunk
            out.append(time.perf_counter() - t0)
            if not buf.startswith(b"220"):
                raise LoadError("greeting %r" % buf[:200])
            s.sendall(quit_line)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        finally:
            s.close()
    return out


# -- FTP client ----------------------------------------------------------------

def ftp_connect(host, port, user="bench", password="bench", timeout=120.0):
    ftp = ftplib.FTP()
    ftp.connect(host, port, timeout=timeout)
    ftp.login(user, password)
    ftp.voidcmd("TYPE I")
    return ftp


def ftp_upload(host, port, path, name, user="bench", timeout=300.0):
    ftp = ftp_connect(host, port, user, timeout=timeout)
    try:
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            ftp.storbinary("STOR " + name, f, blocksize=1 << 16)
        return time.perf_counter() - t0
    finally:
        _quit(ftp)


def ftp_download(host, port, name, dest, user="bench", timeout=300.0):
    """Returns (seconds, sha256 of what arrived)."""
    ftp = ftp_connect(host, port, user, timeout=timeout)
    h = hashlib.sha256()
    try:
        t0 = time.perf_counter()
        with open(dest, "wb") as f:
            def put(block):
                h.update(block)
                f.write(block)
            ftp.retrbinary("RETR " + name, put, blocksize=1 << 16)
        return time.perf_counter() - t0, h.hexdigest()
    finally:
        _quit(ftp)


def _quit(ftp):
    try:
        ftp.quit()
    except (ftplib.Error, OSError, EOFError):
        ftp.close()


def ftp_concurrent(host, port, files, workdir, timeout=120.0):
    """One session per (name, data): upload, download back in the same
    session, compare.  All sessions at once (threads).  Returns
    {'wall': s, 'errors': [...], 'sessions': n}."""
    errors = []

    def one(name, data):
        try:
            ftp = ftp_connect(host, port, timeout=timeout)
            try:
                src = os.path.join(workdir, name + ".src")
                with open(src, "wb") as f:
                    f.write(data)
                with open(src, "rb") as f:
                    ftp.storbinary("STOR " + name, f, blocksize=1 << 16)
                got = []
                ftp.retrbinary("RETR " + name, got.append, blocksize=1 << 16)
                if b"".join(got) != data:
                    errors.append("%s: downloaded bytes differ" % name)
            finally:
                _quit(ftp)
        except (ftplib.Error, OSError, EOFError) as e:
            errors.append("%s: %s: %s" % (name, type(e).__name__, e))

    threads = [threading.Thread(target=one, args=fd) for fd in files]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall": time.perf_counter() - t0, "errors": errors, "sessions": len(files)}


# -- clamd ---------------------------------------------------------------------

def clamd_fildes(unix_path, path, timeout=600.0):
    """One FILDES scan of path (the cheapest way to ask clamd); returns
    (seconds, reply text)."""
    with open(path, "rb") as f, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        t0 = time.perf_counter()
        s.connect(unix_path)
        s.sendall(b"zFILDES\0")
        socket.send_fds(s, [b"\0"], [f.fileno()])
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        return time.perf_counter() - t0, reply.rstrip(b"\0").decode("latin-1")
