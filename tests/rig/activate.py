"""Real per-connection spawning for tests: systemd-socket-activate --inetd.

activated(argv) runs argv once per connection with the client socket on
fd 0/1, exactly as inetd or a systemd .socket with Accept=yes would, on a
free loopback port, and stops the launcher by its PID afterwards.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

ACTIVATE = "/usr/bin/systemd-socket-activate"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


def free_port(host="127.0.0.1"):
    """A port nobody listens on right now (the kernel picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02, what="condition"):
    """Poll predicate() until it is true; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def _connectable(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _listening(pid, port):
    """Is the launcher (pid) listening on port?  Checked through
    /proc/net/tcp{,6} so that probing does not spawn a connection."""
    hexport = ":%04X" % port
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[1].endswith(hexport) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


@contextlib.contextmanager
def activated(argv, env=None, host="127.0.0.1", port=None, stderr=None):
    """Run argv per connection on host:port (a free port when None); yields
    (host, port).  host '::' gives a dual-stack listener, '::1' IPv6.
    env: the spawned program's environment besides PATH (the venv's bin
    first), passed with -E."""
    port = port or free_port("::" if host == "::" else host)
    bind = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    full_env = dict(os.environ)
    full_env["PATH"] = VENV_BIN + os.pathsep + full_env.get("PATH", "/usr/bin:/bin")
    full_env.pop("LISTEN_FDS", None)
    if env:
        full_env.update(env)
    # systemd-socket-activate hands its children only TERM, PATH and HOME
    # (as systemd does): everything else must be named with -E.
    passed = []
    for key, value in sorted((env or {}).items()):
        passed += ["-E", "%s=%s" % (key, value)]
    passed += ["-E", "PATH=" + full_env["PATH"]]
    proc = subprocess.Popen([ACTIVATE, "--inetd", "-a", "-l", bind] + passed + list(argv),
                            env=full_env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=stderr if stderr is not None else subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: proc.poll() is not None or _listening(proc.pid, port),
                   timeout=15, what="systemd-socket-activate on %s" % bind)
        if proc.poll() is not None:
            raise RuntimeError("systemd-socket-activate exited %s" % proc.returncode)
        yield (host if host != "::" else "127.0.0.1", port)
    finally:
        # The launcher only; its children are per-connection proxies that
        # end with their connection.  Kill our own process group by PID.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def proxy_argv(name, config_path, *extra):
    """argv for one of our launchers from the venv (never the pyenv shim)."""
    return [os.path.join(VENV_BIN, name), "-c", config_path] + list(extra)


def write_config(directory, text=""):
    """A config file in directory with a private spool, quarantine and log
    file there, followed by text (more sections or keys).  Returns its path.

    The private sections are written only when text does not already name
    them, so a test can replace [spool], [quarantine] or [log] wholesale."""
    directory = str(directory)
    spool = os.path.join(directory, "spool")
    quarantine = os.path.join(directory, "quarantine")
    os.makedirs(spool, mode=0o700, exist_ok=True)
    os.makedirs(quarantine, mode=0o750, exist_ok=True)
    head = []
    if "[log]" not in text:
        head.append("[log]\nfile = %s\nlevel = debug\n" % os.path.join(directory, "virusgw.log"))
    if "[spool]" not in text:
        head.append("[spool]\ndirectory = %s\n" % spool)
    if "[quarantine]" not in text:
        head.append("[quarantine]\ndirectory = %s\n" % quarantine)
    # Top-level keys (before any section) must come first in configobj.
    lines = text.splitlines(True)
    top = []
    while lines and not lines[0].lstrip().startswith("["):
        top.append(lines.pop(0))
    path = os.path.join(directory, "virusgw.conf")
    with open(path, "w") as f:
        f.write("".join(top) + "\n".join(head) + "".join(lines))
    return path


if __name__ == "__main__":      # a quick manual check: python -m tests.rig.activate CMD...
    with activated(sys.argv[1:]) as (h, p):
        print("listening on %s:%d; Ctrl-C to stop" % (h, p))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
