"""Run one proxy's main() per connection under a profiler (bench only).

    profdriver.py MODE OUTDIR MODULE -- ARGV...

MODE importtime: run as `python -X importtime profdriver.py ...`; the
proxy's own redirection of fd 2 to /dev/null is skipped (only here) so that
the import timings of the whole start path reach the launcher's stderr.
MODE cprofile: cProfile from before the proxy's first import to its exit,
dumped to OUTDIR/PID.prof.  MODE pyinstrument: the same with pyinstrument,
saved to OUTDIR/PID.pyisession.

The proxy code is not changed; the driver only wraps it.
"""

import os
import sys


def main():
    mode, outdir, modname = sys.argv[1:4]
    argv = sys.argv[sys.argv.index("--") + 1:]
    real_dup2 = os.dup2

    def dup2(fd, fd2, inheritable=True):
        if fd2 == 2 and mode == "importtime":
            return fd2
        return real_dup2(fd, fd2, inheritable)

    os.dup2 = dup2
    sys.argv = argv

    def run():
        import importlib
        return importlib.import_module(modname).main()

    if mode == "importtime":
        return run()
    if mode == "cprofile":
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
        try:
            return run()
        finally:
            prof.disable()
            prof.dump_stats(os.path.join(outdir, "%d.prof" % os.getpid()))
    if mode == "pyinstrument":
        from pyinstrument import Profiler
        prof = Profiler(interval=0.0002)
        prof.start()
        try:
            return run()
        finally:
            prof.stop()
            prof.last_session.save(os.path.join(outdir, "%d.pyisession" % os.getpid()))
    raise SystemExit("unknown mode %r" % mode)


if __name__ == "__main__":
    sys.exit(main())
