"""The FTP server the FTP loads go to, straight or through the proxy:
pyftpdlib, one user bench/bench with full rights on one folder, loopback.

Run as its own process: python ftpserver.py PORT HOME
"""

import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer


def main(argv):
    port, home = int(argv[1]), argv[2]
    logging.basicConfig(level=logging.WARNING)
    auth = DummyAuthorizer()
    auth.add_user("bench", "bench", home, perm="elradfmwMT")
    handler = FTPHandler
    handler.authorizer = auth
    handler.banner = "bench ftp ready"
    server = FTPServer(("127.0.0.1", port), handler)
    server.max_cons = 512
    server.serve_forever(handle_exit=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
