"""Warm forking mode for both proxies: one long-lived parent that has
imported everything a connection needs, and a fork per connection.

The per-connection mode (inetd `nowait`, systemd Accept=yes) pays the
interpreter start and the imports on every connection (~10-40 ms).  Here
the parent owns the LISTENING socket, accepts, and forks; the child puts
the connection on fds 0 and 1 and runs the proxy's unchanged main(), so a
connection costs one fork (~1 ms) instead.

How the launchers get here (listening(), called first by bin/virusgw-*):
- systemd .socket with Accept=no: $LISTEN_PID is our pid and
  $LISTEN_FDS >= 1: the listener is fd 3 (sd_listen_fds(3));
- inetd `wait` (or Accept=no with StandardInput=socket): fd 0 is a
  listening socket (SO_ACCEPTCONN).
Anything else (a connected socket, a pipe, a terminal) is today's path.

Each child loads the configuration itself in main() (through the
validated-config cache), so a change applies to the next connection; the
parent reads it only for [prefork] max_children and [log].  The children
drop privileges in main() as before; the parent keeps the rights it was
started with (needed to spawn a root-only `command:` FTP upstream): start
it as the unprivileged user when no such upstream is needed.

Parent: at most max_children live children (then it stops accepting and
the kernel's backlog holds new clients until one ends); children are
reaped on SIGCHLD; SIGTERM/SIGINT stop accepting at once and the parent
exits when its children have finished their sessions (a second SIGTERM
passes SIGTERM on to them).  The parent never writes to fds 0-2 (under
inetd they are the listening socket): it logs through scanlib.log.
"""

import os

# Modules a connection needs, imported by the parent before it forks (the
# point of this mode).  Missing optional ones are skipped.
PRELOAD = {
    "smtpproxy.main": (
        "smtpproxy.replies", "smtpproxy.session", "smtpproxy.address",
        "smtpproxy.datareader", "smtpproxy.mime", "smtpproxy.message",
        "smtpproxy.rewrite", "smtpproxy.upstream",
    ),
    "ftpproxy.main": (
        "ftpproxy.replies", "ftpproxy.session", "ftpproxy.addr", "ftpproxy.data",
        "ftpproxy.upstream",
    ),
}
COMMON = (
    "scanlib.config", "scanlib.log", "scanlib.net", "scanlib.privs", "scanlib.spool",
    "scanlib.verdict", "scanlib.policy", "scanlib.filetype", "scanlib.scanner",
    "scanlib.quarantine", "pyclamd", "pyclamd.pyclamd",
    "socket", "_socket", "select", "errno", "struct", "time", "signal", "subprocess",
    "shlex", "threading", "concurrent.futures", "ipaddress", "ssl", "hashlib",
    "json", "datetime", "fnmatch", "codecs", "binascii", "random", "pwd", "grp",
    "fcntl", "stat", "re", "urllib.parse", "sqlite3",
)
# Pure calls with harmless input that compile what the modules compile on
# first use (regular expressions), so that the children find them in the re
# module's cache.  The SMTP address parser is hand-written (no regexes);
# the MIME splitter compiles its patterns lazily.
WARM = {
    "smtpproxy.main": (
        ("smtpproxy.mime", "precompile", (), {}),
    ),
    "ftpproxy.main": (
        ("ftpproxy.addr", "parse_port", ("127,0,0,1,4,1",), {}),
        ("ftpproxy.addr", "parse_eprt", ("|1|127.0.0.1|1025|",), {}),
    ),
}
DEFAULT_MAX_CHILDREN = 100


def _accepting(fd):
    """Is fd a listening socket?  One getsockopt on the C-level socket
    type (no dup: the object is detached again, fd stays open)."""
    import _socket
    try:
        s = _socket.socket(fileno=fd)
    except OSError:                 # not a socket (ENOTSOCK), or closed
        return False
    try:
        return s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN) != 0
    except OSError:
        return False
    finally:
        s.detach()


def listening(environ=None):
    """The listening socket's fd we were started with, or None."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") == str(os.getpid()):
        try:
            n = int(env.get("LISTEN_FDS", "0"))
        except ValueError:
            n = 0
        if n >= 1 and _accepting(3):
            return 3
    if _accepting(0):
        return 0
    return None


def _args(argv):
    """-c PATH and -d from the proxies' command line (they take the same)."""
    path, debug = None, False
    i = 0
    while i < len(argv):
        if argv[i] == "-c" and i + 1 < len(argv):
            path = argv[i + 1]
            i += 1
        elif argv[i] == "-d":
            debug = True
        i += 1
    return path, debug


def _settings(ident, argv):
    """(logger, max_children) from the config; defaults when it is unusable
    (each child then answers 421 for it, as in the per-connection mode)."""
    from scanlib import config as C
    from scanlib import log as L
    path, debug = _args(argv)
    problem = None
    try:
        conf = C.load(path)
        logfile = conf["log"]["file"]
        level = conf["log"].get("level", "info")
        max_children = int((conf.get("prefork") or {}).get("max_children",
                                                            DEFAULT_MAX_CHILDREN))
        _precreate(logfile, conf.get("user", ""))
    except Exception as e:          # ConfigError or anything: never a traceback
        problem = "; ".join(e.problems) if hasattr(e, "problems") else repr(e)
        logfile, level, max_children = "", "info", DEFAULT_MAX_CHILDREN
    log = L.setup(ident, logfile, debug, level)
    if problem:
        log.error("prefork: configuration unusable (%s); max_children=%d; every "
                  "connection will be answered 421 until it is fixed", problem, max_children)
    return log, max(1, max_children)


def _precreate(logfile, user):
    """A root parent with `user` set must not create the log file as root:
    its children, dropped to user, could no longer append to it.  Create it
    as the child would have (0640, owned by user and its group)."""
    if not logfile or not user or os.geteuid() != 0 or os.path.exists(logfile):
        return
    import pwd
    try:
        pw = pwd.getpwnam(user)
        fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o640)
    except (KeyError, OSError):
        return                      # the children report what is wrong
    try:
        os.fchown(fd, pw.pw_uid, pw.pw_gid)
    except OSError:
        pass
    finally:
        os.close(fd)


def preload(module_name):
    """Import the proxy and what its connections need; returns main()."""
    import importlib
    main = importlib.import_module(module_name).main
    for name in PRELOAD.get(module_name, ()) + COMMON:
        try:
            importlib.import_module(name)
        except Exception:           # optional (e.g. a module not built yet)
            pass
    for mod, func, args, kwargs in WARM.get(module_name, ()):
        try:
            getattr(importlib.import_module(mod), func)(*args, **kwargs)
        except Exception:           # a warm-up only: the child does it again
            pass
    return main


def serve(module_name, listen_fd, argv=None):
    """Accept on listen_fd and run module_name's main() in a child per
    connection.  Returns the parent's exit status (0 after SIGTERM)."""
    import signal
    import socket
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    ident = "virusgw-%s" % module_name.split(".")[0]
    log, max_children = _settings(ident, argv)
    main = preload(module_name)
    import gc
    gc.freeze()     # the warm objects: no collector work on them in the children, fewer copied pages

    # inetd `wait` hands the listener as fds 0, 1 and 2 (systemd with
    # StandardInput=socket as 0 besides 3): only listen_fd stays a listener,
    # or a copy would keep the port open after SIGTERM.
    for fd in (0, 1, 2):
        if fd != listen_fd and _accepting(fd):
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
    # Nothing in the children may take the listener for their own.
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    lsock = socket.socket(fileno=listen_fd)
    lsock.setblocking(False)        # a client gone before accept() must not block us
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    state = {"stop": 0}

    def on_term(signum, frame):
        state["stop"] += 1

    def on_chld(signum, frame):
        pass                        # the wakeup fd does the work

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGCHLD, on_chld)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    children = set()
    log.info("prefork: pid %d serving on fd %d, max_children=%d", os.getpid(), listen_fd,
             max_children)

    def reap():
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                children.clear()
                return
            if pid == 0:
                return
            children.discard(pid)
            if os.WIFSIGNALED(status):
                log.warning("prefork: child %d killed by signal %d", pid, os.WTERMSIG(status))

    def drain():
        try:
            while os.read(wake_r, 512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    import select
    while not state["stop"]:
        reap()
        full = len(children) >= max_children
        watch = [wake_r] if full else [wake_r, lsock]
        try:
            ready = select.select(watch, [], [], 5.0)[0]
        except InterruptedError:
            continue
        if wake_r in ready:
            drain()
        if state["stop"] or full or lsock not in ready:
            continue
        try:
            conn, _ = lsock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        except OSError as e:        # EMFILE, ENFILE, ENOBUFS: back off a little
            log.error("prefork: accept failed: %s", e)
            select.select([wake_r], [], [], 0.1)
            continue
        try:
            pid = os.fork()
        except OSError as e:
            log.error("prefork: fork failed: %s; closing the connection", e)
            conn.close()
            continue
        if pid == 0:
            _child(conn, listen_fd, lsock, (wake_r, wake_w), old, main)   # never returns
        children.add(pid)
        conn.close()

    # SIGTERM: no new connections; running sessions finish.
    lsock.close()
    log.info("prefork: stopping; waiting for %d session(s)", len(children))
    forwarded = 1
    while children:
        if state["stop"] > forwarded:
            forwarded = state["stop"]
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        reap()
        if children:
            try:
                select.select([wake_r], [], [], 1.0)
            except InterruptedError:
                pass
            drain()
    log.info("prefork: stopped")
    return 0


def _child(conn, listen_fd, lsock, wake, old_handlers, main):
    """In the forked child: become a per-connection proxy, never return."""
    rc = 1
    try:
        import signal
        signal.set_wakeup_fd(-1)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in wake:
            os.close(fd)
        fd = conn.detach()
        lsock.detach()
        if listen_fd > 1:
            os.close(listen_fd)     # fd 0/1 are replaced below
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        if fd > 1:
            os.close(fd)
        rc = main()
        rc = rc if isinstance(rc, int) else (0 if rc is None else 1)
    except SystemExit as e:         # sys.exit() in main: its status, as the launcher would
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:           # never back into the parent's loop
        rc = 1
    os._exit(rc)
