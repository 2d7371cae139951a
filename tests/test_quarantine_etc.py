"""The shipped purge timer, service and cron line: systemd accepts the units
without a word, and the command both run really purges a store."""

import datetime
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from scanlib import quarantine as q
from scanlib.quarantine import Store
from tests.rig.activate import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(ROOT, "etc")
VIRUSGW = os.path.join(os.path.dirname(sys.executable), "virusgw")
INSTALLED = "/usr/local/sbin/virusgw"


def read(name):
    with open(os.path.join(ETC, name)) as f:
        return f.read()


def exec_start():
    lines = [l for l in read("virusgw-purge.service").splitlines() if l.startswith("ExecStart=")]
    assert len(lines) == 1
    return shlex.split(lines[0][len("ExecStart="):])


def cron_command():
    entries = [l for l in read("virusgw.cron").splitlines()
               if l.strip() and not l.lstrip().startswith("#") and "=" not in l.split()[0]]
    assert len(entries) == 1
    fields = entries[0].split(None, 6)
    minute, hour, dom, mon, dow, user, command = fields
    assert re.fullmatch(r"[0-9]+", minute) and 0 <= int(minute) < 60
    assert re.fullmatch(r"[0-9]+", hour) and 0 <= int(hour) < 24
    assert (dom, mon, dow) == ("*", "*", "*")
    assert user == "virusgw"
    return command


def test_units_verify_cleanly(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (package systemd)")
        pytest.skip("systemd-analyze is missing")
    # verify wants the program to exist: point ExecStart at the venv's
    svc = read("virusgw-purge.service").replace(INSTALLED, VIRUSGW)
    (tmp_path / "virusgw-purge.service").write_text(svc)
    (tmp_path / "virusgw-purge.timer").write_text(read("virusgw-purge.timer"))
    p = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "virusgw-purge.service"),
                        str(tmp_path / "virusgw-purge.timer")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == "" and p.stderr == "", p


def test_timer_and_service_belong_together():
    timer = read("virusgw-purge.timer")
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer
    assert "WantedBy=timers.target" in timer
    svc = read("virusgw-purge.service")
    assert "Type=oneshot" in svc and "ReadWritePaths=/var/lib/virusgw/quarantine" in svc
    assert exec_start()[0] == INSTALLED


def make_old(store, qid, days):
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=days)
    new = q.new_id(when)
    os.rename(store.path(qid), store.path(new))
    return new


@pytest.mark.parametrize("which", ["service", "cron"])
def test_the_shipped_command_purges(tmp_path, which):
    conf = write_config(tmp_path, "[quarantine]\ndirectory = %s\nmax_age = 30d\n"
                        "max_total_size = 1000\n" % (tmp_path / "quarantine"))
    store = Store(str(tmp_path / "quarantine"))
    old = make_old(store, store.add(io.BytesIO(b"o" * 10), {}), 31)
    mid = make_old(store, store.add(io.BytesIO(b"m" * 700), {}), 10)
    new = store.add(io.BytesIO(b"n" * 300), {})
    if which == "service":
        argv = [VIRUSGW] + exec_start()[1:]
        env = dict(os.environ, VIRUSGW_CONF=conf)
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    else:
        # the cron line's command, run by sh with the cron file's PATH plus the venv
        command = cron_command()
        env = dict(os.environ, VIRUSGW_CONF=conf,
                   PATH=os.path.dirname(VIRUSGW) + ":/usr/sbin:/usr/bin:/sbin:/bin")
        p = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True,
                           text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p
    # age: the 31-day entry; size: 90% of 1000 leaves room for 900, so the
    # oldest of the rest (700 + 300 > 900) goes too
    assert store.ids() == [new]
    assert not store.exists(old) and not store.exists(mid)
    assert store.usage() == 300
