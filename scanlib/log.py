"""Logging for processes whose stdout and stderr may be a client's socket.

setup(): syslog facility mail when /dev/log exists, else append to [log]
file; stderr only with -d (debug, run by hand).  Without -d, fd 2 is pointed
at /dev/null first, and the logger never raises, so a failing log never
prints a traceback into the client's socket under inetd.

summary(): one line of key=value fields, hostile text escaped (controls,
spaces, quotes, non-ASCII), for the one-line-per-message/transfer logs.
"""

import os
import time

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
LEVELS = {"debug": DEBUG, "info": INFO, "warning": WARNING, "error": ERROR}
_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}
# syslog severities (RFC 5424) and facility mail (2)
_SEVERITY = {DEBUG: 7, INFO: 6, WARNING: 4, ERROR: 3}
_FACILITY_MAIL = 2


class Logger:
    """A small logger with the logging.Logger calls the proxies use
    (debug/info/warning/error/exception, printf-style args).

    Not the logging package: importing it (with traceback, threading,
    string formatting machinery) costs ~5-9 ms on every connection.  Each
    record is one os.write() to an O_APPEND file (atomic between the
    processes sharing it), one datagram to /dev/log, or stderr with -d.
    It never raises: a log that cannot be written is dropped."""

    def __init__(self):
        self.level = INFO
        self.ident = "virusgw"
        self.pid = os.getpid()
        self.fds = []          # file descriptors written as text lines
        self.syslog = None     # connected AF_UNIX datagram socket
        self.stderr = False

    def isEnabledFor(self, level):
        return level >= self.level

    def debug(self, msg, *args):
        if DEBUG >= self.level:
            self._emit(DEBUG, msg, args)

    def info(self, msg, *args):
        if INFO >= self.level:
            self._emit(INFO, msg, args)

    def warning(self, msg, *args):
        if WARNING >= self.level:
            self._emit(WARNING, msg, args)

    def error(self, msg, *args):
        self._emit(ERROR, msg, args)

    critical = error

    def exception(self, msg, *args):
        """error() plus the current traceback (traceback imported only now)."""
        try:
            import traceback
            tb = traceback.format_exc().rstrip("\n")
        except Exception:
            tb = ""
        self._emit(ERROR, msg, args, tb)

    def _emit(self, level, msg, args, tail=""):
        try:
            if args:
                try:
                    msg = str(msg) % args
                except Exception:
                    msg = "%s %r" % (msg, args)
            else:
                msg = str(msg)
            if tail:
                msg = msg + "\n" + tail
            name = _NAMES.get(level, "INFO")
            if self.fds or self.stderr:
                now = time.time()
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                line = ("%s,%03d %s[%d]: %s %s\n" % (stamp, int(now % 1 * 1000), self.ident,
                                                   self.pid, name, msg)).encode("utf-8", "backslashreplace")
                for fd in self.fds:
                    write_all(fd, line)
                if self.stderr:
                    write_all(2, line)
            if self.syslog is not None:
                pri = _FACILITY_MAIL * 8 + _SEVERITY.get(level, 6)
                for part in msg.split("\n"):
                    self.syslog.send(("<%d>%s[%d]: %s" % (pri, self.ident, self.pid, part))
                                     .encode("utf-8", "backslashreplace")[:8000])
        except Exception:
            pass

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []
        if self.syslog is not None:
            try:
                self.syslog.close()
            except OSError:
                pass
            self.syslog = None


def write_all(fd, data):
    """Write all of data to fd; an error (the peer left) is dropped."""
    try:
        while data:
            n = os.write(fd, data)
            data = data[n:]
    except OSError:
        pass


LOG = Logger()


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
    """Configure the 'virusgw' logger for one proxy process; returns it.
    [log] file when set, else syslog (facility mail) when /dev/log exists,
    else nowhere; with debug also stderr (and fd 2 is left alone)."""
    if not debug:
        quiet_stderr()
    LOG.close()
    LOG.ident = ident
    LOG.pid = os.getpid()
    LOG.level = DEBUG if debug else LEVELS.get(str(level).lower(), INFO)
    LOG.stderr = bool(debug)
    if logfile:
        try:
            LOG.fds.append(os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o640))
        except OSError:
            pass
    elif os.path.exists("/dev/log"):
        try:
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            s.connect("/dev/log")
            LOG.syslog = s
        except OSError:
            pass
    return LOG


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
