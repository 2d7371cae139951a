"""Shared fixtures: a private clamd with the test signatures (tests/sigs).

clamd        session-scoped clamd, generous limits (400M), unix socket +
             loopback TCP port; .unix_path .tcp_port .endpoints .pid
clamd_small  the same with StreamMaxLength/MaxFileSize/MaxScanSize 32K, for
             size-limit tests (the B26 case expects 32K)

Both are stopped by PID at the end of the session.  Without a clamd binary
the tests that need one are skipped on a workstation, but fail under CI
($CI set): there a missing clamd is a broken setup, never a pass.

Hypothesis: deadline=None everywhere (a loaded 2-core machine misses the
200 ms default), derandomized under CI so that a run is reproducible.
"""

import os

import pytest

from tests.rig import clamd as rig

try:
    from hypothesis import settings as _hsettings
except ImportError:       # hypothesis is in the test extra; tolerate its absence here
    _hsettings = None

IN_CI = bool(os.environ.get("CI"))

if _hsettings is not None:
    _hsettings.register_profile("dev", deadline=None)
    _hsettings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))


def _need_clamd():
    if rig.clamd_binary():
        return
    msg = "clamd is not installed (apt-get install clamav-daemon)"
    if IN_CI:
        pytest.fail(msg + ": required under CI", pytrace=False)
    pytest.skip(msg)


def _start(tmp_path_factory, name, limits):
    _need_clamd()
    c = rig.Clamd(str(tmp_path_factory.mktemp(name)), limits=limits)
    try:
        c.start()
    except rig.ClamdError as e:
        pytest.fail("private clamd did not start: %s" % e, pytrace=False)
    return c


@pytest.fixture(scope="session")
def clamd(tmp_path_factory):
    c = _start(tmp_path_factory, "clamd", rig.DEFAULT_LIMITS)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def clamd_small(tmp_path_factory):
    c = _start(tmp_path_factory, "clamd-small", rig.SMALL_LIMITS)
    yield c
    c.stop()
