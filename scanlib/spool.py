"""The spool: private temp files for bodies, portions and transfers.

The directory is 0700, files 0600 (O_EXCL, random names).  Every file a
Spool hands out is removed by close()/cleanup(), which main loops call on
every exit path; install_signal_cleanup() turns SIGTERM/SIGHUP/SIGPIPE into
SystemExit so that finally blocks run.  Nothing here is ever named by the
network.
"""

import os

# O_NOFOLLOW|O_EXCL: a planted link or file is never opened, only a new file.
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class Spool:
    def __init__(self, directory):
        self.directory = directory
        self.paths = []

    def check(self):
        """Refuse a spool that others can read or that is not a directory."""
        st = os.stat(self.directory)
        import stat
        if not stat.S_ISDIR(st.st_mode):
            raise OSError("%s is not a directory" % self.directory)
        if st.st_mode & 0o077:
            os.chmod(self.directory, 0o700)

    def create(self, prefix="vgw-", suffix=""):
        """A new spool file opened w+b (0600).  Removed at cleanup()."""
        # Not tempfile.mkstemp: importing tempfile (shutil, random, bz2,
        # lzma) costs ~3 ms on every connection.  Same guarantees: a random
        # name, O_EXCL, mode 0600, retried on the (unlikely) collision.
        for _ in range(100):
            path = os.path.join(self.directory, "%s%s%s" % (prefix, os.urandom(8).hex(), suffix))
            try:
                fd = os.open(path, _FLAGS, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError("no free spool name in %s" % self.directory)
        self.paths.append(path)
        f = os.fdopen(fd, "w+b")
        # os.fdopen names the file by its descriptor number: name it by its
        # path, so that forget(f) finds it and scanners can use f.name.
        f.raw.name = path
        return f

    def forget(self, f):
        """Remove one file now (closing it)."""
        path = getattr(f, "name", None)
        try:
            f.close()
        except OSError:
            pass
        if path in self.paths:
            self.paths.remove(path)
            _unlink(path)

    def cleanup(self):
        paths, self.paths = self.paths, []
        for p in paths:
            _unlink(p)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()
        return False


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def make_spool_dir(directory):
    """Create the spool directory 0700 (install step, not the proxies)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)


def install_signal_cleanup():
    """SIGTERM/SIGHUP/SIGPIPE raise SystemExit so finally blocks (and
    Spool.cleanup) run before the process ends."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
