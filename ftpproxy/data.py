"""Data connections on the client's side, and the byte pumps.

The proxy terminates the client's data connection itself:
  PASV/EPSV  a listener on a port of [ftp] passive_ports, bound to the
             address the client reached the proxy on.  A connection from
             any address but the client's is closed at once and the
             listener stays open for the client (RFC 2577: no port
             stealing).  A listener the client abandons (a new PASV, a
             PORT, the end of a transfer) is closed.
  PORT/EPRT  the proxy connects to the client's own address (checked in
             ftpproxy.addr) from its own front address.

The pumps move bytes between sockets and spool files in large blocks
(recv_into a 1 MiB buffer, sendfile for file to socket) and convert ASCII
line ends for the client when TYPE A is in force: the server always gets
TYPE I, and what is scanned is what the server stores or serves.  Each
pump calls a `tick()` between blocks so that the main loop can notice ABOR
on the control connection; tick() raising stops the pump.
"""

import os
import random
import select
import socket
import time

from scanlib import net

BLOCK = 1 << 20
TICK = 0.1              # seconds between checks for ABOR while data flows


class DataError(Exception):
    """A data connection could not be made or broke: 425/426."""


class TooBig(DataError):
    """More bytes than the caller's limit ([scanner] max_size): the rest
    is never read."""


class Aborted(Exception):
    """The client sent ABOR (raised from a tick())."""


def _big(sock):
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * BLOCK)
        except OSError:
            pass


class PassiveListener:
    def __init__(self, local, family, port_range, client):
        """local: the proxy's address on the control connection (as
        getsockname gave it); client: the client's normalised address."""
        self.client = net.normalise(client) if client else None
        lo, hi = port_range
        ports = list(range(lo, hi + 1))
        start = random.randrange(len(ports))
        ports = ports[start:] + ports[:start]
        last = None
        for port in ports[:2000]:
            s = socket.socket(family, socket.SOCK_STREAM)
            _big(s)             # before listen: accepted sockets inherit it
            try:
                s.bind((local, port))
                s.listen(4)
            except OSError as e:
                s.close()
                last = e
                continue
            self.sock = s
            self.port = port
            return
        raise DataError("no free passive port in %d-%d (%s)" % (lo, hi, last))

    def accept(self, timeout, tick=None):
        """The client's data connection; strangers are dropped and waited
        past.  Raises DataError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DataError("the client did not open the data connection in time")
            r, _, _ = select.select([self.sock], [], [], min(left, 0.5))
            if tick:
                tick()
            if not r:
                continue
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            try:
                ok = self.client is None or net.normalise(peer[0]) == self.client
            except ValueError:
                ok = False
            if not ok:
                conn.close()
                continue
            _big(conn)
            return conn

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def connect_active(family, local, address, port, timeout):
    """Connect to the client's PORT/EPRT address from the proxy's own front
    address (local)."""
    target = str(address)
    if family == socket.AF_INET6 and address.version == 4:
        target = "::ffff:" + target          # dual-stack front socket
    s = socket.socket(family, socket.SOCK_STREAM)
    _big(s)
    s.settimeout(timeout)
    try:
        try:
            s.bind((local, 0))
        except OSError:
            pass
        s.connect((target, port))
    except OSError as e:
        s.close()
        raise DataError("cannot connect to %s port %d: %s" % (address, port, e.strerror or e))
    s.settimeout(None)
    return s


def _wait(sock, write, timeout, tick):
    """Wait until sock is ready; tick() every half second; DataError on
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DataError("data connection timed out")
        if write:
            _, w, _ = select.select([], [sock], [], min(left, 0.5))
            ready = w
        else:
            r, _, _ = select.select([sock], [], [], min(left, 0.5))
            ready = r
        if tick:
            tick()
        if ready:
            return


def recv_to_file(sock, f, timeout, tick=None, ascii=False, limit=None):
    """Read sock to EOF into f.  Returns the number of bytes written.
    DataError on a reset, a timeout or more than limit bytes (the caller
    forwards nothing in that case)."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total = 0
    carry = b""
    next_tick = 0.0
    sock.setblocking(False)
    try:
        while True:
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                _wait(sock, False, timeout, tick)
                continue
            except OSError as e:
                raise DataError("data connection failed: %s" % (e.strerror or e))
            if n == 0:
                break
            if ascii:
                chunk = carry + bytes(view[:n])
                carry = b""
                if chunk.endswith(b"\r"):
                    chunk, carry = chunk[:-1], b"\r"
                chunk = chunk.replace(b"\r\n", b"\n")
                f.write(chunk)
                total += len(chunk)
            else:
                f.write(view[:n])
                total += n
            if limit is not None and total > limit:
                raise TooBig("more than %d bytes" % limit)
            if tick:
                now = time.monotonic()
                if now >= next_tick:        # a select() per block would cost more
                    next_tick = now + TICK
                    tick()
        if carry:
            f.write(carry)
            total += len(carry)
    finally:
        try:
            sock.setblocking(True)
        except OSError:
            pass
    f.flush()
    return total


def send_file(sock, f, offset, timeout, tick=None, ascii=False):
    """Send f from offset to sock (sendfile in binary mode, LF -> CRLF in
    ASCII mode).  Returns bytes sent.  DataError when the peer goes away or
    stalls for timeout."""
    size = os.fstat(f.fileno()).st_size
    pos = offset
    sent = 0
    sock.settimeout(timeout)
    try:
        if not ascii:
            next_tick = 0.0
            while pos < size:
                if tick:
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = now + TICK
                        tick()
                try:
                    n = os.sendfile(sock.fileno(), f.fileno(), pos, min(8 * BLOCK, size - pos))
                except (BlockingIOError, InterruptedError):
                    _wait(sock, True, timeout, tick)
                    continue
                except OSError as e:
                    raise DataError("data connection failed: %s" % (e.strerror or e))
                if n == 0:
                    break
                pos += n
                sent += n
        else:
            f.seek(offset)
            while True:
                if tick:
                    tick()
                chunk = f.read(BLOCK)
                if not chunk:
                    break
                out = chunk.replace(b"\n", b"\r\n")
                try:
                    sock.sendall(out)
                except OSError as e:
                    raise DataError("data connection failed: %s" % (e.strerror or e))
                sent += len(out)
    finally:
        try:
            sock.settimeout(None)
        except OSError:
            pass
    return sent


def copy_served(src, dst, offset, ascii):
    """Write into dst exactly the bytes a RETR serves from src: from the
    REST offset (counted in stored bytes) to the end, LF -> CRLF in ASCII
    mode (the same conversion send_file does).  Returns the size."""
    total = 0
    pos = offset
    while True:
        block = os.pread(src.fileno(), BLOCK, pos)
        if not block:
            break
        pos += len(block)
        if ascii:
            block = block.replace(b"\n", b"\r\n")
        dst.write(block)
        total += len(block)
    dst.flush()
    return total


def pump(src, dst, timeout, tick=None):
    """Copy src to dst until EOF (listings).  Returns bytes copied.  Waits
    in slices so that tick() (ABOR) is seen even while nothing moves."""
    total = 0
    src.setblocking(False)
    dst.settimeout(timeout)
    try:
        while True:
            try:
                data = src.recv(BLOCK)
            except (BlockingIOError, InterruptedError):
                _wait(src, False, timeout, tick)
                continue
            except OSError as e:
                raise DataError("data connection failed: %s" % (e.strerror or e))
            if not data:
                return total
            try:
                dst.sendall(data)
            except OSError as e:
                raise DataError("data connection failed: %s" % (e.strerror or e))
            total += len(data)
            if tick:
                tick()
    finally:
        try:
            src.setblocking(True)
        except OSError:
            pass


def finish(sock):
    """Close a data connection after sending: FIN, then close."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
