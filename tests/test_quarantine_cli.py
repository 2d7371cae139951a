"""`virusgw quarantine ...` through click's CliRunner and through the real
bin/virusgw (as installed in the venv): list filters and --json, show,
delete, purge by age and size, hostile IDs refused by every command, and
the index staying consistent with the files."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st
from click.testing import CliRunner

from scanlib import cli, quarantine as q
from scanlib.quarantine import Store
from tests.rig.activate import write_config

VIRUSGW = os.path.join(os.path.dirname(sys.executable), "virusgw")
MISSING = "20200101-000000-000000-000000000000"


class Result:
    def __init__(self, code, outb, err):
        self.code, self.outb, self.err = code, outb, err
        self.out = outb.decode("utf-8", "replace")

    def __repr__(self):
        return "Result(%r, out=%r, err=%r)" % (self.code, self.out[:300], self.err[:300])


def run_runner(args, input=None):
    r = CliRunner().invoke(cli.main, args, input=input, catch_exceptions=False)
    return Result(r.exit_code, r.stdout_bytes, r.stderr)


def run_bin(args, input=None):
    p = subprocess.run([VIRUSGW] + args, input=(input or "").encode(), capture_output=True,
                       timeout=120)
    return Result(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"))


@pytest.fixture(params=["runner", "bin"])
def run(request):
    return run_runner if request.param == "runner" else run_bin


@pytest.fixture
def env(tmp_path):
    conf = write_config(tmp_path, "[smtp]\nupstream = smtp:127.0.0.1:9\n")
    store = Store(str(tmp_path / "quarantine"))
    return conf, store


def age(store, qid, when):
    """Move an entry to an older ID (as if it had been made at `when`, UTC)."""
    new = q.new_id(when)
    os.rename(store.path(qid), store.path(new))
    store.update(new, lambda m: m.update(created=q.utc_text(q.id_time(new))))
    return new


def populate(store):
    import datetime
    ids = {}
    ids["eicar_in"] = store.add(io.BytesIO(b"From: a\r\n\r\nX\r\n"), {
        "protocol": "smtp", "direction": "inbound", "sender": "alice@outside.example",
        "recipients": ["bob@inside.example", "carol@inside.example"],
        "viruses": ["VirusGW.Test.EICAR.UNOFFICIAL"], "action": "quarantine",
        "subject": "evil\x1b[2J\x07subject", "reason": "infected"})
    ids["trojan_out"] = store.add(io.BytesIO(b"From: c\r\n\r\nY\r\n"), {
        "protocol": "smtp", "direction": "outbound", "sender": "Dave@Corp.Example",
        "recipients": ["eve@far.example"], "viruses": ["Win.Trojan.Agent-1"],
        "action": "reject", "reason": "infected"})
    ids["ftp"] = store.add(io.BytesIO(b"ftp bytes"), {
        "protocol": "ftp", "direction": "inbound", "ftp_user": "anonymous",
        "ftp_server": "192.0.2.1", "ftp_path": "/pub/x.exe", "filename": "x.exe",
        "viruses": ["VirusGW.Test.EICAR.UNOFFICIAL"], "action": "quarantine"})
    rel = store.add(io.BytesIO(b"released"), {
        "protocol": "smtp", "direction": "inbound", "sender": "", "recipients": ["bob@inside.example"],
        "viruses": ["Other.Virus"], "action": "quarantine"})
    store.update(rel, lambda m: m.update(state="released"))
    ids["released"] = rel
    old = store.add(io.BytesIO(b"old" * 10), {
        "protocol": "smtp", "direction": "inbound", "sender": "old@outside.example",
        "recipients": ["bob@inside.example"], "viruses": ["Old.Virus"], "action": "quarantine"})
    ids["old"] = age(store, old, datetime.datetime(2020, 6, 1, 12, 0, 0, tzinfo=datetime.timezone.utc))
    return ids


def listed(run, conf, *args):
    r = run(["quarantine", "list", "-c", conf, "--json"] + list(args))
    assert r.code == 0, r
    return [json.loads(line) for line in r.out.splitlines()]


def test_list_filters_and_json(run, env):
    conf, store = env
    ids = populate(store)
    rows = listed(run, conf)
    assert [r["id"] for r in rows] == sorted(ids.values(), reverse=True)    # newest first
    assert rows[-1]["id"] == ids["old"]
    assert all("history" not in r and "sha256" in r for r in rows)

    def got(*args):
        return {r["id"] for r in listed(run, conf, *args)}
    assert got("--protocol", "ftp") == {ids["ftp"]}
    assert got("--direction", "outbound") == {ids["trojan_out"]}
    assert got("--virus", "virusgw.test.*") == {ids["eicar_in"], ids["ftp"]}
    assert got("--virus", "*Trojan*") == {ids["trojan_out"]}
    assert got("--sender", "*@corp.example") == {ids["trojan_out"]}
    assert got("--sender", "") == {ids["released"]}              # the null sender <>
    assert got("--recipient", "carol@*") == {ids["eicar_in"]}
    assert got("--state", "released") == {ids["released"]}
    assert got("--state", "blocked") == {ids["trojan_out"]}
    assert got("--until", "2021-01-01") == {ids["old"]}
    assert got("--since", "2021-01-01T00:00Z") == set(ids.values()) - {ids["old"]}
    assert got("--since", "30d") == set(ids.values()) - {ids["old"]}
    assert got("--protocol", "smtp", "--direction", "inbound", "--state", "quarantined") == \
        {ids["eicar_in"], ids["old"]}
    assert len(listed(run, conf, "--limit", "2")) == 2


def test_list_table_for_people(run, env):
    conf, store = env
    ids = populate(store)
    r = run(["quarantine", "list", "-c", conf])
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].startswith("ID ") and "STATE" in lines[0]
    assert len(lines) == 1 + len(ids)
    assert "\x1b" not in r.out and "\x07" not in r.out
    line = next(x for x in lines if x.startswith(ids["eicar_in"]))
    assert "quarantined" in line and "smtp/inb" in line and "<alice@outside.example> -> bob@inside.example +1" in line
    line = next(x for x in lines if x.startswith(ids["ftp"]))
    assert line.endswith("anonymous@192.0.2.1:/pub/x.exe") and "ftp/inb" in line


def test_list_bad_options(run, env):
    conf, store = env
    for args in (["--since", "yesterday-ish"], ["--protocol", "gopher"], ["--limit", "-1"]):
        r = run(["quarantine", "list", "-c", conf] + args)
        assert r.code == 2, (args, r)


def test_index_follows_the_files(env):
    conf, store = env
    ids = populate(store)
    index_path = os.path.join(store.directory, q.INDEX_NAME)
    assert len(listed(run_runner, conf)) == 5
    assert os.path.exists(index_path)
    # a new entry written by a proxy (the index knows nothing of it)
    new = store.add(io.BytesIO(b"new"), {"protocol": "ftp", "action": "quarantine"})
    rows = listed(run_runner, conf)
    assert rows[0]["id"] == new and len(rows) == 6
    # an entry removed behind the index's back
    shutil.rmtree(store.path(ids["ftp"]))
    assert ids["ftp"] not in {r["id"] for r in listed(run_runner, conf)}
    # a damaged meta.json is shown as damaged, not hidden
    new2 = store.add(io.BytesIO(b"x"), {})
    with open(store.path(new2, "meta.json"), "w") as f:
        f.write("{not json")
    rows = listed(run_runner, conf, "--state", "damaged")
    assert [r["id"] for r in rows] == [new2]
    # the index removed, then garbage: rebuilt from the files each time
    os.unlink(index_path)
    assert len(listed(run_runner, conf)) == 6
    with open(index_path, "wb") as f:
        f.write(b"this is not a database" * 100)
    assert len(listed(run_runner, conf)) == 6
    # release/delete change meta.json and the index together
    store.update(ids["eicar_in"], lambda m: m.update(state="released"))
    q.Index(store).put(store.get(ids["eicar_in"]))
    assert {r["id"] for r in listed(run_runner, conf, "--state", "released")} == \
        {ids["eicar_in"], ids["released"]}
    r = run_runner(["quarantine", "reindex", "-c", conf])
    assert r.code == 0 and "indexed 5 entries" in r.out, r     # the damaged one is not indexed
    assert len(listed(run_runner, conf)) == 6


def test_show_record_content_and_output(run, env, tmp_path):
    conf, store = env
    ids = populate(store)
    qid = ids["eicar_in"]
    r = run(["quarantine", "show", "-c", conf, qid])
    assert r.code == 0, r
    assert "sender:          alice@outside.example" in r.out
    assert "\\x1b[2J\\x07subject" in r.out and "\x1b" not in r.out
    r = run(["quarantine", "show", "-c", conf, qid, "--json"])
    assert json.loads(r.out) == store.get(qid)
    r = run(["quarantine", "show", "-c", conf, qid, "--content"])
    assert r.code == 0 and r.outb == b"From: a\r\n\r\nX\r\n", r
    out = tmp_path / "saved.eml"
    r = run(["quarantine", "show", "-c", conf, qid, "--output", str(out)])
    assert r.code == 0 and out.read_bytes() == b"From: a\r\n\r\nX\r\n", r
    r = run(["quarantine", "show", "-c", conf, ids["ftp"], "--output", str(out)])
    assert r.code == 2 and "exists" in r.err and out.read_bytes() == b"From: a\r\n\r\nX\r\n", r
    r = run(["quarantine", "show", "-c", conf, ids["ftp"], "--output", str(out), "--force"])
    assert r.code == 0 and out.read_bytes() == b"ftp bytes", r


HOSTILE = ["../x", "/etc/passwd", "x" * 5000, ".", "..", "-",
           "20261203-171012-123456-3f9a1c2b7d8e/../../etc",
           "../20261203-171012-123456-3f9a1c2b7d8e", "20261203-171012-123456-3F9A1C2B7D8E "]


@pytest.mark.parametrize("command", [["show"], ["show", "--content"], ["release"],
                                     ["release", "--output", "/tmp/virusgw-never"],
                                     ["delete", "--yes"]])
def test_hostile_ids_refused_by_every_command(run, env, command):
    conf, store = env
    ids = populate(store)
    before = sorted(os.listdir(store.directory))
    hostile = HOSTILE + (["a\x00b", "\x00" * 35] if run is run_runner else [])
    for bad in hostile:
        args = ["quarantine"] + command[:1] + ["-c", conf] + command[1:] + ["--", bad]
        r = run(args)
        assert r.code == 2, (bad, r)
        assert r.out == "" and r.err.startswith("virusgw: not a quarantine ID: "), (bad, r)
        assert len(r.err.strip().splitlines()) == 1 and len(r.err) < 200
    # a good ID next to a bad one: nothing is deleted
    r = run(["quarantine", "delete", "-c", conf, "--yes", ids["ftp"], "../x"])
    assert r.code == 2
    assert sorted(os.listdir(store.directory)) == before
    assert not os.path.exists("/tmp/virusgw-never")


def test_not_found_is_exit_1(run, env):
    conf, store = env
    populate(store)
    for args in (["show", "-c", conf, MISSING], ["release", "-c", conf, MISSING],
                 ["delete", "-c", conf, "--yes", MISSING]):
        r = run(["quarantine"] + args)
        assert r.code == 1, r
        assert MISSING in r.err and len(r.err.strip().splitlines()) == 1


def test_config_error_is_exit_78(run, tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("[quarantine]\nno_such_key = 1\n")
    r = run(["quarantine", "list", "-c", str(bad)])
    assert r.code == 78 and "no_such_key" in r.err, r


def test_delete_asks_unless_yes(run, env):
    conf, store = env
    ids = populate(store)
    r = run(["quarantine", "delete", "-c", conf, ids["ftp"]], input="n\n")
    assert r.code == 1 and store.exists(ids["ftp"]), r
    r = run(["quarantine", "delete", "-c", conf, ids["ftp"]], input="y\n")
    assert r.code == 0 and not store.exists(ids["ftp"]), r
    r = run(["quarantine", "delete", "-c", conf, "-y", ids["old"], ids["released"]])
    assert r.code == 0 and not store.exists(ids["old"]) and not store.exists(ids["released"]), r
    assert {x["id"] for x in listed(run, conf)} == {ids["eicar_in"], ids["trojan_out"]}
    assert store.usage() == store.measure()


def test_purge_by_age_and_size(run, env):
    import datetime
    import time
    conf, store = env
    ids = populate(store)
    now = datetime.datetime.now(datetime.timezone.utc)
    ids["40d"] = age(store, store.add(io.BytesIO(b"4" * 100), {}), now - datetime.timedelta(days=40))
    ids["20d"] = age(store, store.add(io.BytesIO(b"2" * 100), {}), now - datetime.timedelta(days=20))
    # a temp folder a crashed writer left two hours ago, and a fresh one
    stale = os.path.join(store.directory, ".tmp-deadbeefdeadbeef")
    fresh = os.path.join(store.directory, ".tmp-0123456789abcdef")
    os.mkdir(stale)
    os.mkdir(fresh)
    os.utime(stale, (time.time() - 7200,) * 2)

    r = run(["quarantine", "purge", "-c", conf, "--older-than", "30d", "--dry-run"])
    assert r.code == 0, r
    assert sorted(x.split()[-1] for x in r.out.splitlines() if x.startswith("would")) == \
        sorted([ids["40d"], ids["old"]])
    assert store.exists(ids["40d"]) and os.path.isdir(stale)

    listed(run, conf)                                  # build the index first
    r = run(["quarantine", "purge", "-c", conf, "--older-than", "30d"])
    assert r.code == 0 and "purged 2 entries" in r.out, r
    assert not store.exists(ids["40d"]) and not store.exists(ids["old"])
    assert store.exists(ids["20d"]) and store.exists(ids["eicar_in"])
    assert not os.path.exists(stale) and os.path.isdir(fresh)
    assert {x["id"] for x in listed(run, conf)} == set(ids.values()) - {ids["40d"], ids["old"]}

    # the default age is [quarantine] max_age (30d): nothing more to do
    r = run(["quarantine", "purge", "-c", conf])
    assert r.code == 0 and "purged 0 entries" in r.out, r

    # size pass: the oldest go first until the total fits
    total = store.measure()
    r = run(["quarantine", "purge", "-c", conf, "--older-than", "0", "--max-size", str(total - 1)])
    assert r.code == 0 and "purged 1 entries" in r.out, r
    assert not store.exists(ids["20d"])
    assert store.usage() == store.measure() == total - 100
    r = run(["quarantine", "purge", "-c", conf, "--max-size", "lots"])
    assert r.code == 2, r


def test_help_lists_the_commands(run):
    r = run(["quarantine", "--help"])
    assert r.code == 0
    for name in ("list", "show", "release", "delete", "purge", "reindex"):
        assert name in r.out


def test_planted_symlinks_are_never_followed(env, tmp_path):
    conf, store = env
    populate(store)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "content").write_bytes(b"not for you")
    (secret / "meta.json").write_text('{"protocol": "ftp"}')
    fake = "20261203-171012-123456-3f9a1c2b7d8e"
    os.symlink(str(secret), os.path.join(store.directory, fake))
    real = store.add(io.BytesIO(b"x"), {"protocol": "ftp"})
    os.unlink(store.content_path(real))
    os.symlink(str(secret / "content"), store.content_path(real))
    for qid in (fake, real):
        r = run_runner(["quarantine", "show", "-c", conf, qid, "--content"])
        assert r.code == 75 and b"not for you" not in r.outb, r
        r = run_runner(["quarantine", "release", "-c", conf, qid, "--output", str(tmp_path / "o")])
        assert r.code == 75 and not os.path.exists(str(tmp_path / "o")), r
    r = run_runner(["quarantine", "delete", "-c", conf, "--yes", fake, real])
    assert r.code == 0, r
    assert sorted(os.listdir(str(secret))) == ["content", "meta.json"]     # untouched
    assert not os.path.lexists(os.path.join(store.directory, fake))


DROP = "import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); " \
       "sys.argv[0] = 'virusgw'; from scanlib.cli import main; main(prog_name='virusgw')"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_group_member_lists_read_only(tmp_path):
    """A member of [quarantine] group may read but not write the store: list
    still sees every entry (read-only index + what it reads itself)."""
    import tempfile
    base = tempfile.mkdtemp(prefix="virusgw-qro-")        # pytest's tmp root is 0700
    try:
        os.chmod(base, 0o755)
        qdir = os.path.join(base, "quarantine")
        conf = os.path.join(base, "virusgw.conf")
        with open(conf, "w") as f:
            f.write("[quarantine]\ndirectory = %s\ngroup = 65534\n[spool]\ndirectory = %s\n"
                    "[log]\nfile = %s/log\n" % (qdir, base, base))
        os.chmod(conf, 0o644)
        store = Store(qdir, group="65534")
        old = store.add(io.BytesIO(b"a"), {"protocol": "ftp", "action": "quarantine"})

        def as_member(*args):
            p = subprocess.run([sys.executable, "-c", DROP, "quarantine"] + list(args) + ["-c", conf],
                               capture_output=True, timeout=120, cwd=os.path.dirname(
                                   os.path.dirname(os.path.abspath(__file__))))
            return Result(p.returncode, p.stdout, p.stderr.decode("utf-8", "replace"))
        r = as_member("list", "--json")                     # no index, cannot make one
        assert r.code == 0 and [json.loads(x)["id"] for x in r.out.splitlines()] == [old], r
        assert not os.path.exists(os.path.join(qdir, q.INDEX_NAME))
        assert run_runner(["quarantine", "list", "-c", conf]).code == 0     # root builds it
        new = store.add(io.BytesIO(b"b"), {"protocol": "ftp", "action": "delete"})
        shutil.rmtree(store.path(old))
        r = as_member("list", "--json")                     # read-only index + the files
        assert r.code == 0 and [json.loads(x)["id"] for x in r.out.splitlines()] == [new], r
        r = as_member("show", new, "--content")
        assert r.code == 0 and r.outb == b"b", r
        r = as_member("delete", "--yes", new)
        assert r.code == 75 and store.exists(new), r
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_show_content_refuses_a_terminal(env):
    import pty
    conf, store = env
    qid = store.add(io.BytesIO(b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR"), {"protocol": "ftp"})
    master, slave = pty.openpty()
    try:
        p = subprocess.run([VIRUSGW, "quarantine", "show", "-c", conf, qid, "--content"],
                           stdout=slave, stderr=subprocess.PIPE, timeout=120)
        os.close(slave)
        slave = None
        got = b""
        try:
            while True:
                block = os.read(master, 4096)
                if not block:
                    break
                got += block
        except OSError:                 # EIO: the terminal's other side is closed
            pass
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert p.returncode == 2 and b"terminal" in p.stderr, p
    assert b"EICAR" not in got


@pytest.fixture(scope="module")
def varied_store(tmp_path_factory):
    """40 entries with varied protocols, directions, states, senders,
    recipients and viruses, and their index built."""
    import datetime
    d = tmp_path_factory.mktemp("varied")
    store = Store(str(d / "q"))
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    viruses = [[], ["Eicar-Test"], ["Win.Trojan.A", "Doc.X"], ["VirusGW.Test.EICAR.UNOFFICIAL"]]
    for i in range(40):
        meta = {"protocol": "ftp" if i % 3 == 0 else "smtp",
                "direction": ["inbound", "outbound", ""][i % 3],
                "viruses": viruses[i % 4], "action": "quarantine" if i % 5 else "reject"}
        if meta["protocol"] == "smtp":
            meta.update(sender=["", "A@x.example", "b@Y.example"][i % 3],
                        recipients=[["c@x.example"], ["d@y.example", "E@x.example"], []][i % 3])
        qid = age(store, store.add(io.BytesIO(b"%d" % i), meta),
                  base + datetime.timedelta(days=i))
        if i % 7 == 0:
            store.update(qid, lambda m: m.update(state="released"))
    q.Index(store).rebuild()
    return store


GLOBS = ["*", "", "*x.example", "*@Y.*", "e*", "eicar*", "*trojan*", "[ab]@*", "?@x.example",
         "*.unofficial", "nomatch"]


@given(state=st.sampled_from([None, "quarantined", "blocked", "released"]),
       protocol=st.sampled_from([None, "smtp", "ftp"]),
       direction=st.sampled_from([None, "inbound", "outbound"]),
       since=st.sampled_from([None, "2026-01-05T00:00:00.000000Z", "2026-02-01"]),
       until=st.sampled_from([None, "2026-01-20T00:00:00.000000Z", "2025-01-01"]),
       virus=st.sampled_from([None] + GLOBS), sender=st.sampled_from([None] + GLOBS),
       recipient=st.sampled_from([None] + GLOBS), limit=st.sampled_from([0, 1, 5]))
def test_sql_filters_agree_with_the_python_filter(varied_store, state, protocol, direction,
                                                  since, until, virus, sender, recipient, limit):
    """The index answers in SQL; a read-only user's fresh entries are
    filtered in Python: both must say the same for every filter."""
    flt = q.Filter(state=state, protocol=protocol, direction=direction, since=since,
                   until=until, virus=virus, sender=sender, recipient=recipient, limit=limit)
    ix = q.Index(varied_store)
    try:
        everything = list(ix.select())
        got = [r.id for r in ix.select(flt)]
    finally:
        ix.close()
    want = [r.id for r in everything if flt.matches(r)]
    if limit:
        want = want[:limit]
    assert got == want
    assert len(everything) == 40


def test_list_into_a_closed_pipe_is_not_an_error(env):
    """`virusgw quarantine list --json | head -1` under `set -o pipefail`:
    the reader leaving early is no failure of ours (exit 0, nothing on
    stderr)."""
    conf, store = env
    populate(store)
    # populate() writes few entries: make the output outgrow the pipe buffer.
    for _ in range(300):
        store.add(io.BytesIO(b"x"), {"protocol": "ftp", "viruses": ["V"]})
    p = subprocess.run(["bash", "-o", "pipefail", "-c",
                        '"$0" quarantine list --json -c "$1" | head -c 1 >/dev/null; '
                        'echo "${PIPESTATUS[0]}"', VIRUSGW, conf],
                       capture_output=True, timeout=60)
    assert p.stdout.strip() == b"0", p
    assert p.stderr == b""
