"""The scan worker (a bare _thread, smtpproxy/message.py) never holds the
proxy process up: after [smtp] deadline answered for a hung scanner, the
connection ends and the process exits long before the scanner's timeout."""

import os
import re
import socket

import pytest

from tests.rig.activate import wait_until
from tests.test_smtp_proxy import CLEAN, log_text, proxy, send, sink  # noqa: F401 (fixture)

pytestmark = pytest.mark.clamd


def _gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_process_exits_after_deadline_with_scan_still_hanging(tmp_path, clamd, sink):
    hung = socket.socket()              # accepts connections (backlog), never answers
    hung.bind(("127.0.0.1", 0))
    hung.listen(50)
    try:
        with proxy(tmp_path, clamd, sink.upstream, "deadline = 1\n",
                   scanner="tcp:127.0.0.1:%d" % hung.getsockname()[1],
                   scanner_text="timeout = 60\n") as hp:
            err, _ = send(hp, CLEAN)
            log = log_text(tmp_path)
            pid = int(re.search(r"virusgw-smtpproxy\[(\d+)\]", log).group(1))
            # the scan itself would hang for 60 s: the process must not wait for it
            wait_until(lambda: _gone(pid), timeout=20, what="proxy %d exits" % pid)
    finally:
        hung.close()
    assert err.smtp_code == 451 and sink.messages == []
