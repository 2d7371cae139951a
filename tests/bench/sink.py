"""A fast SMTP sink for the benchmarks: accepts everything, counts and
checksums every message.

Run as its own process (``python sink.py PORT``) so that its CPU is not the
bench driver's.  One asyncio loop, plain Protocols (no streams, no aiosmtpd
state machine): a sink that costs more than the gateways it measures would
flatten every ratio.

For each message it records the value of the ``X-Bench-Id`` header and the
SHA-256 of the body (everything after the first empty line, unstuffed), so
the bench can prove that every message arrived and arrived intact even when
a gateway prepends headers.  Control commands on the same port (loopback
only; the bench's own, not SMTP):

    XSTATS          250 {"count": N, "bytes": N}
    XDUMP PATH      write {"id": "sha256", ...} as JSON to PATH, then 250
    XCLEAR          forget everything counted so far

What it does not do: relay, store bodies, or check anything about the SMTP
dialogue beyond what it needs to find the end of DATA.
"""

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import sys

TERM = b"\r\n.\r\n"
ID_RE = re.compile(rb"^X-Bench-Id:[ \t]*(\S+)", re.I | re.M)

STATE = {"count": 0, "bytes": 0}
SEEN = {}


def record(data):
    """data: the DATA content as received, starting with the CRLF before
    it (so that a leading dot is stuffed like any other) and ending just
    before the terminating CRLF.CRLF."""
    content = data.replace(b"\r\n..", b"\r\n.")[2:] + b"\r\n"
    end = content.find(b"\r\n\r\n")
    head, body = (content, b"") if end < 0 else (content[:end + 2], content[end + 4:])
    m = ID_RE.search(head)
    key = m.group(1).decode("ascii", "replace") if m else "#%d" % STATE["count"]
    SEEN[key] = hashlib.sha256(body).hexdigest()
    STATE["count"] += 1
    STATE["bytes"] += len(content)


class Sink(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.buf = bytearray()
        self.data = None            # bytearray while inside DATA
        self.searched = 0
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(b"220 sink.bench ESMTP ready\r\n")

    def data_received(self, chunk):
        if self.data is not None:
            self.data += chunk
            self._find_end()
            return
        self.buf += chunk
        self._commands()

    def _find_end(self):
        i = self.data.find(TERM, max(0, self.searched - 4))
        if i < 0:
            self.searched = len(self.data)
            return
        rest = bytes(self.data[i + 5:])
        record(bytes(self.data[:i]))
        self.data = None
        self.t.write(b"250 2.0.0 queued\r\n")
        self.buf = bytearray(rest)
        self._commands()

    def _commands(self):
        out = []
        while self.data is None:
            i = self.buf.find(b"\n")
            if i < 0:
                break
            line = bytes(self.buf[:i + 1]).rstrip(b"\r\n")
            del self.buf[:i + 1]
            verb = line[:4].upper()
            if verb == b"EHLO":
                out.append(b"250-sink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                           b"250 SIZE 4294967295\r\n")
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                self.data = bytearray(b"\r\n")
                self.searched = 0
                self.data += self.buf
                self.buf = bytearray()
                if out:
                    self.t.write(b"".join(out))
                    out = []
                self._find_end()
                return
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 bye\r\n")
                self.t.write(b"".join(out))
                self.t.close()
                return
            elif verb == b"XSTA":
                out.append(b"250 " + json.dumps(STATE).encode() + b"\r\n")
            elif verb == b"XDUM":
                path = line.split(None, 1)[1].decode()
                with open(path + ".tmp", "w") as f:
                    json.dump(SEEN, f)
                os.rename(path + ".tmp", path)
                out.append(b"250 dumped\r\n")
            elif verb == b"XCLE":
                SEEN.clear()
                STATE.update(count=0, bytes=0)
                out.append(b"250 cleared\r\n")
            elif verb in (b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP", b"XFOR", b"XCLI"):
                out.append(b"250 2.0.0 ok\r\n")
            else:
                out.append(b"502 5.5.2 not here\r\n")
        if out:
            self.t.write(b"".join(out))

    def eof_received(self):
        return False


def main(argv):
    port = int(argv[1])
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(Sink, "127.0.0.1", port, backlog=1024, reuse_address=True))
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
