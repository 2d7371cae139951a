"""`virusgw scan`: through click's CliRunner and through the installed
.venv/bin/virusgw, against the real clamd rig."""

import json
import os
import subprocess

import pytest
from click.testing import CliRunner

from scanlib.cli import main, ExitCode
from tests.rig import clamd as rig
from tests.rig.activate import write_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIRUSGW = os.path.join(REPO, ".venv", "bin", "virusgw")


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "files"
    d.mkdir()
    (d / "clean.txt").write_bytes(b"nothing to see\n")
    (d / "eicar.com").write_bytes(rig.EICAR)
    (d / "body: tricky name").write_bytes(b"..." + rig.BODY_MARKER)
    (d / "big.bin").write_bytes(b"b" * 5000)
    return {p.name: str(p) for p in d.iterdir()}


def conf_for(tmp_path, endpoints, extra=""):
    return write_config(tmp_path, "[scanner]\nclamd = %s\ntimeout = 30\n%s"
                        % (", ".join(endpoints), extra))


def run(args, env=None):
    r = CliRunner().invoke(main, args, env=env)
    return r.exit_code, r.output


@pytest.mark.parametrize("method", ["auto", "fildes", "stream", "path"])
def test_scan_every_method(clamd, tmp_path, files, method):
    conf = conf_for(tmp_path, clamd.endpoints)
    code, out = run(["scan", "-c", conf, "--method", method, files["clean.txt"]])
    assert (code, out) == (0, "%s: OK\n" % files["clean.txt"])
    code, out = run(["scan", "-c", conf, "--method", method, files["clean.txt"],
                     files["eicar.com"], files["body: tricky name"]])
    assert code == ExitCode.INFECTED == 1
    assert out.splitlines() == [
        "%s: OK" % files["clean.txt"],
        "%s: %s FOUND" % (files["eicar.com"], rig.EICAR_NAME),
        "%s: %s FOUND" % (files["body: tricky name"], rig.BODY_NAME),
    ]


def test_scan_reports_each_unscannable_reason(clamd, clamd_small, tmp_path, files):
    # size-limit, ours: max_size below the file
    conf = conf_for(tmp_path, clamd.endpoints, "max_size = 1000\n[smtp]\nmax_message_size = 1000\n")
    code, out = run(["scan", "-c", conf, files["big.bin"], files["clean.txt"]])
    assert code == ExitCode.UNSCANNABLE == 2
    assert out.splitlines()[0].startswith("%s: size-limit (" % files["big.bin"])
    assert out.splitlines()[0].endswith(" ERROR")
    assert out.splitlines()[1] == "%s: OK" % files["clean.txt"]
    # size-limit, clamd's (StreamMaxLength 32K)
    big = tmp_path / "over-32k"
    big.write_bytes(b"x" * 40000)
    code, out = run(["scan", "-c", conf_for(tmp_path, clamd_small.endpoints),
                     "--method", "stream", str(big)])
    assert code == 2 and ": size-limit (INSTREAM size limit exceeded.) ERROR" in out
    # encrypted
    from tests.test_scanner import zipcrypto
    enc = tmp_path / "enc.zip"
    enc.write_bytes(zipcrypto("x.com", rig.EICAR, b"pw"))
    code, out = run(["scan", "-c", conf_for(tmp_path, clamd.endpoints), str(enc)])
    assert code == 2 and out.startswith("%s: encrypted (Heuristics.Encrypted" % enc)
    # unavailable: clamd down
    code, out = run(["scan", "-c", conf_for(tmp_path, ["unix:/nonexistent/clamd.sock"]),
                     files["eicar.com"]])
    assert code == 2 and out.startswith("%s: unavailable (" % files["eicar.com"])
    # a missing file is unscannable, not clean
    code, out = run(["scan", "-c", conf_for(tmp_path, clamd.endpoints), str(tmp_path / "nope")])
    assert code == 2 and "unavailable" in out and "No such file" in out


def test_infected_beats_unscannable_in_exit_code(clamd, tmp_path, files):
    conf = conf_for(tmp_path, clamd.endpoints)
    code, out = run(["scan", "-c", conf, str(tmp_path / "missing"), files["eicar.com"]])
    assert code == 1


def test_clamd_option_and_json(clamd, tmp_path, files):
    conf = conf_for(tmp_path, ["unix:/nonexistent/clamd.sock"])
    code, out = run(["scan", "-c", conf, "--clamd", "unix:/nonexistent/x",
                     "--clamd", clamd.tcp_endpoint, "--json",
                     files["eicar.com"], files["clean.txt"]])
    assert code == 1
    data = json.loads(out)
    assert data == [
        {"file": files["eicar.com"], "verdict": "infected", "viruses": [rig.EICAR_NAME]},
        {"file": files["clean.txt"], "verdict": "clean"},
    ]


def test_usage_and_config_errors(tmp_path, files):
    code, out = run(["scan", "-c", str(tmp_path / "missing.conf"), files["clean.txt"]])
    assert code == ExitCode.CONFIG == 78
    code, out = run(["scan", "-c", conf_for(tmp_path, ["unix:/x"])])   # no FILE
    assert code == 2 and "FILE" in out
    code, out = run(["scan", "-c", conf_for(tmp_path, ["unix:/x"]), "--method", "telepathy",
                     files["clean.txt"]])
    assert code == 2
    code, out = run(["scan", "-c", conf_for(tmp_path, ["unix:/x"]), "--clamd", "smtp:bad",
                     files["clean.txt"]])
    assert code == 2 and "endpoint" in out


def test_installed_command(clamd, tmp_path, files):
    """The real launcher, config found through $VIRUSGW_CONF."""
    conf = conf_for(tmp_path, clamd.endpoints)
    env = dict(os.environ, VIRUSGW_CONF=conf)
    r = subprocess.run([VIRUSGW, "scan", files["eicar.com"], files["clean.txt"]],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1, r.stderr
    assert r.stdout.splitlines() == ["%s: %s FOUND" % (files["eicar.com"], rig.EICAR_NAME),
                                     "%s: OK" % files["clean.txt"]]
    assert r.stderr == ""
    r = subprocess.run([VIRUSGW, "scan", files["clean.txt"]], capture_output=True, text=True,
                       env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, "%s: OK\n" % files["clean.txt"])
