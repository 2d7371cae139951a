"""Logging for processes whose stdout and stderr may be a client's socket.

setup(): syslog facility mail when /dev/log exists, else append to [log]
file; stderr only with -d (debug, run by hand).  Without -d, fd 2 is pointed
at /dev/null first and logging.raiseExceptions is off, so a failing handler
never prints a traceback into the client's socket under inetd.

summary(): one line of key=value fields, hostile text escaped (controls,
spaces, quotes, non-ASCII), for the one-line-per-message/transfer logs.
"""

import logging
import os
import sys

LOG = logging.getLogger("virusgw")


def quiet_stderr():
    """Point fd 2 at /dev/null (under inetd it is the client's socket)."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 2)
        if fd != 2:
            os.close(fd)
    except OSError:
        pass


def setup(ident, logfile="", debug=False, level="info"):
    """Configure the 'virusgw' logger for one proxy process; returns it."""
    logging.raiseExceptions = False
    if not debug:
        quiet_stderr()
    LOG.handlers[:] = []
    LOG.propagate = False
    LOG.setLevel(logging.DEBUG if debug else getattr(logging, level.upper(), logging.INFO))
    pid = os.getpid()
    if debug:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%s[%d]: %%(levelname)s %%(message)s" % (ident, pid)))
        LOG.addHandler(h)
    if logfile:
        try:
            h = _SafeFileHandler(logfile, delay=True)
            h.setFormatter(logging.Formatter(
                "%%(asctime)s %s[%d]: %%(levelname)s %%(message)s" % (ident, pid)))
            LOG.addHandler(h)
        except OSError:
            pass
    elif os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler
        try:
            h = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_MAIL)
            h.setFormatter(logging.Formatter("%s[%d]: %%(message)s" % (ident, pid)))
            LOG.addHandler(h)
        except OSError:
            pass
    if not LOG.handlers:
        LOG.addHandler(logging.NullHandler())
    return LOG


class _SafeFileHandler(logging.FileHandler):
    """FileHandler whose delayed open cannot raise: logging.FileHandler opens
    the file in emit() outside its error handling, so a missing directory
    or a full disk raised into the proxy (and its traceback went to fd 2)."""

    def emit(self, record):
        try:
            logging.FileHandler.emit(self, record)
        except Exception:
            self.handleError(record)


_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                  b"@.:_-+/=,<>[]()!#$%&*?^{}|~'")


def escape(value):
    """Log-safe text: printable ASCII kept, everything else (spaces,
    controls, quotes, backslash, non-ASCII) as \\xNN; empty -> '-'."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ",".join(escape(v) for v in value) or "-"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    elif not isinstance(value, (bytes, bytearray)):
        value = str(value).encode("utf-8", "replace")
    if not value:
        return "-"
    if len(value) > 512:
        value = bytes(value[:512]) + b"..."
    return "".join(chr(b) if b in _SAFE else "\\x%02x" % b for b in value)


def summary(**fields):
    """'k1=v1 k2=v2 ...' with every value escaped; order as given."""
    return " ".join("%s=%s" % (k, escape(v)) for k, v in fields.items())
