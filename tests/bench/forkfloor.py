"""What a pre-forking design would cost per connection (bench only).

A parent that has already imported the proxy's modules listens itself and
forks one child per connection; the child greets, answers one command with
221 and exits.  Its connect-to-greeting time, beside the per-connection
floor (floor.py), shows how much of a connection's cost is the interpreter
start and the imports, which a fork from a warm parent does not pay.

    python forkfloor.py PORT
"""

import os
import signal
import socket
import sys


def main(argv):
    port = int(argv[1])
    # What the SMTP proxy imports over a whole session (see -X importtime).
    for name in ("smtpproxy.main", "smtpproxy.session", "smtpproxy.message", "smtpproxy.mime",
                 "smtpproxy.upstream", "scanlib.log", "scanlib.config", "scanlib.net",
                 "scanlib.spool", "scanlib.scanner", "scanlib.policy"):
        try:
            __import__(name)
        except ImportError:
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)       # children reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    while True:
        conn, _ = srv.accept()
        if os.fork() == 0:
            srv.close()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(b"220 fork floor ready\r\n")
            conn.recv(512)
            conn.sendall(b"221 bye\r\n")
            os._exit(0)
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
