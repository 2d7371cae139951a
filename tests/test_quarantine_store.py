"""scanlib.quarantine.Store: entries, IDs, atomicity, limits, permissions,
concurrent writers in several processes, a crash before the rename."""

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, strategies as st

from scanlib import quarantine
from scanlib.quarantine import Store, QuarantineError, BadID, NotFound, check_id

PY = sys.executable
META = {
    "protocol": "smtp", "direction": "inbound", "client": "192.0.2.7",
    "sender": "a@example.org", "recipients": ["b@example.com", "c@example.com"],
    "subject": "hello", "message_id": "<x@y>", "filename": "../../etc/passwd",
    "viruses": ["VirusGW.Test.EICAR.UNOFFICIAL"], "action": "quarantine",
    "reason": "infected", "rule": "smtp.inbound.action=quarantine",
    "scanner_version": "ClamAV 1.4.6", "portion": "1.2", "content_type": "application/x-msdos-program",
}


def entries(d):
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_add_fileobj_writes_content_and_meta(tmp_path):
    store = Store(str(tmp_path / "q"))
    f = io.BytesIO()
    f.write(b"X5O!P%@AP" * 1000)          # position at the end: add reads from the start
    qid = store.add(f, META)
    check_id(qid)
    assert entries(store.directory) == [qid]
    data = open(store.content_path(qid), "rb").read()
    assert data == b"X5O!P%@AP" * 1000
    meta = json.load(open(store.path(qid, "meta.json")))
    assert meta["id"] == qid
    assert meta["size"] == len(data)
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["state"] == "quarantined"
    assert meta["history"] == []
    assert meta["created"].endswith("Z") and meta["created"][:10] == "%s-%s-%s" % (qid[:4], qid[4:6], qid[6:8])
    for k, v in META.items():
        assert meta[k] == v
    # the hostile file name stays a string in meta.json, never a path
    assert not os.path.exists(os.path.join(store.directory, "etc"))
    assert store.get(qid) == meta


def test_add_path_and_spool_file(tmp_path):
    from scanlib.spool import Spool
    sp_dir = tmp_path / "spool"
    sp_dir.mkdir()
    store = Store(str(tmp_path / "q"))
    with Spool(str(sp_dir)) as sp:
        f = sp.create()
        f.write(b"spooled bytes")
        qid1 = store.add(f, {"protocol": "ftp", "action": "quarantine"})
        qid2 = store.add(sp.paths[-1], {"protocol": "ftp", "action": "delete"})
    assert store.open_content(qid1).read() == b"spooled bytes"
    assert store.open_content(qid2).read() == b"spooled bytes"
    assert store.get(qid2)["state"] == "blocked"     # a keep_blocked copy
    assert store.ids() == sorted([qid1, qid2], reverse=True)


def test_computed_keys_cannot_be_forged_and_bytes_are_decoded(tmp_path):
    store = Store(str(tmp_path / "q"))
    qid = store.add(io.BytesIO(b"abc"), {"id": "../evil", "size": 99, "sha256": "0",
                                        "history": ["x"], "subject": b"\xff\x00caf\xc3\xa9",
                                        "recipients": "one@example.com", "viruses": None})
    meta = store.get(qid)
    assert meta["id"] == qid and meta["size"] == 3 and meta["history"] == []
    assert meta["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert meta["subject"] == "\\xff\x00caf\u00e9"
    assert meta["recipients"] == ["one@example.com"]
    assert meta["viruses"] == []
    raw = open(store.path(qid, "meta.json"), "rb").read()
    assert raw.isascii() and b"\x00" not in raw


def test_ids_sort_by_time_and_match_the_pattern(tmp_path):
    store = Store(str(tmp_path / "q"))
    ids = [store.add(io.BytesIO(b"%d" % i), {}) for i in range(20)]
    assert store.ids() == sorted(ids, reverse=True)
    assert sorted(ids) == ids          # made in this order
    assert len(set(ids)) == 20


def test_permissions_no_access_for_others(tmp_path):
    store = Store(str(tmp_path / "q"), group=str(os.getgid()))
    qid = store.add(io.BytesIO(b"x"), META)
    for p in (store.path(qid), store.content_path(qid), store.path(qid, "meta.json")):
        st_ = os.stat(p)
        assert st_.st_mode & 0o007 == 0, p
        assert st_.st_mode & 0o040, p          # group may read
        assert st_.st_gid == os.getgid()
    assert stat.S_IMODE(os.stat(store.path(qid)).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(store.content_path(qid)).st_mode) == 0o640
    assert os.stat(store.directory).st_mode & 0o2000     # setgid: entries inherit the group


def test_unknown_group_is_a_quarantine_error(tmp_path):
    store = Store(str(tmp_path / "q"), group="no-such-group-virusgw")
    with pytest.raises(QuarantineError):
        store.add(io.BytesIO(b"x"), {})


def test_max_total_size_refuses_and_leaves_nothing(tmp_path):
    store = Store(str(tmp_path / "q"), max_total_size=100)
    store.add(io.BytesIO(b"a" * 60), {})
    store.add(io.BytesIO(b"b" * 40), {})          # exactly full
    with pytest.raises(QuarantineError, match="full"):
        store.add(io.BytesIO(b"c"), {})
    assert len(entries(store.directory)) == 2
    assert not [n for n in os.listdir(store.directory) if n.startswith(".tmp-")]
    # deleting frees room; the ledger follows
    qid = store.ids()[0]
    store.delete(qid)
    assert store.usage() == 60
    store.add(io.BytesIO(b"d" * 40), {})
    assert store.recount() == 100


def test_full_store_refuses_before_copying(tmp_path):
    store = Store(str(tmp_path / "q"), max_total_size=100)
    store.add(io.BytesIO(b"a" * 90), {})

    class Counting(io.BytesIO):
        reads = 0

        def read(self, n=-1):
            Counting.reads += 1
            return io.BytesIO.read(self, n)
    src = tmp_path / "big"
    src.write_bytes(b"b" * 20)

    class NoRead:
        """A real file's size, but reading it is a test failure."""
        def __init__(self, f):
            self.f = f

        def fileno(self):
            return self.f.fileno()

        def seek(self, *a):
            return self.f.seek(*a)

        def read(self, n=-1):
            raise AssertionError("content copied although the store is full")
    with open(str(src), "rb") as f:
        with pytest.raises(QuarantineError, match="full"):
            store.add(NoRead(f), {})
    with pytest.raises(QuarantineError, match="full"):
        store.add(str(src), {})
    with pytest.raises(QuarantineError, match="full"):     # no fileno: found out after the copy
        store.add(Counting(b"c" * 20), {})
    assert Counting.reads > 0
    assert len(store.ids()) == 1
    assert not [n for n in os.listdir(store.directory) if n.startswith(".tmp-")]


def test_ledger_missing_is_measured(tmp_path):
    store = Store(str(tmp_path / "q"), max_total_size=10)
    store.add(io.BytesIO(b"12345"), {})
    os.unlink(os.path.join(store.directory, ".usage"))
    with pytest.raises(QuarantineError):
        store.add(io.BytesIO(b"123456"), {})
    assert store.usage() == 5


def test_write_failure_is_a_quarantine_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(QuarantineError):
        Store(str(blocker / "q")).add(io.BytesIO(b"x"), {})

    class Broken(io.BytesIO):
        def read(self, n=-1):
            raise OSError(5, "Input/output error")
    store = Store(str(tmp_path / "q"))
    with pytest.raises(QuarantineError, match="Input/output"):
        store.add(Broken(b"x"), {})
    with pytest.raises(QuarantineError):
        store.add(io.StringIO("text"), {})
    assert os.listdir(store.directory) == [] or all(
        n == ".usage" for n in os.listdir(store.directory))


@given(st.one_of(
    st.text(max_size=80), st.binary(max_size=40), st.integers(), st.none(),
    st.sampled_from(["../x", "/etc/passwd", "a\x00b", "x" * 5000, "..", ".", "",
                     "20261203-171012-123456-3f9a1c2b7d8e\n",
                     "20261203-171012-123456-3f9a1c2b7d8e/../../x",
                     "20261203-171012-123456-3F9A1C2B7D8E",
                     "\u0662\u0660261203-171012-123456-3f9a1c2b7d8e"])))
def test_hostile_ids_are_refused_before_any_path(value):
    ok = isinstance(value, str) and len(value) == 35 and all(
        c in "0123456789abcdef-" for c in value) and [len(p) for p in value.split("-")] == [8, 6, 6, 12] \
        and all(c in "0123456789" for c in value[:22].replace("-", ""))
    if ok:
        assert check_id(value) == value
        return
    with pytest.raises(BadID):
        check_id(value)
    store = Store("/nonexistent-virusgw-q")
    for call in (store.get, store.open_content, store.delete, store.path, store.exists,
                 lambda q: store.update(q, lambda m: m)):
        with pytest.raises(BadID):
            call(value)


def test_get_missing_is_not_found(tmp_path):
    store = Store(str(tmp_path / "q"))
    store.ensure_directory()
    with pytest.raises(NotFound):
        store.get("20261203-171012-123456-3f9a1c2b7d8e")
    with pytest.raises(NotFound):
        store.delete("20261203-171012-123456-3f9a1c2b7d8e")


def test_update_rewrites_meta_atomically(tmp_path):
    store = Store(str(tmp_path / "q"))
    qid = store.add(io.BytesIO(b"x"), META)
    store.update(qid, lambda m: m.update(state="released") or m["history"].append({"event": "release"}))
    meta = store.get(qid)
    assert meta["state"] == "released" and meta["history"] == [{"event": "release"}]
    assert sorted(os.listdir(store.path(qid))) == ["content", "meta.json"]


WRITER = textwrap.dedent("""
    import io, os, sys
    from scanlib.quarantine import Store, QuarantineError
    store = Store(sys.argv[1], max_total_size=int(sys.argv[3]))
    ok = full = 0
    for i in range(int(sys.argv[2])):
        body = (b"%d-%d|" % (os.getpid(), i)) * 50
        try:
            store.add(io.BytesIO(body), {"protocol": "smtp", "sender": str(os.getpid())})
            ok += 1
        except QuarantineError:
            full += 1
    print(ok, full)
""")


def run_writers(directory, n_proc, per_proc, limit):
    procs = [subprocess.Popen([PY, "-c", WRITER, directory, str(per_proc), str(limit)],
                              stdout=subprocess.PIPE) for _ in range(n_proc)]
    out = []
    for p in procs:
        o, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        out.append(tuple(int(x) for x in o.split()))
    return out


def test_concurrent_writers_in_several_processes(tmp_path):
    d = str(tmp_path / "q")
    Store(d).ensure_directory()
    out = run_writers(d, 6, 25, 0)
    assert sum(ok for ok, _ in out) == 150
    store = Store(d)
    ids = store.ids()
    assert len(ids) == 150 and len(set(ids)) == 150
    for qid in ids:
        meta = store.get(qid)
        data = store.open_content(qid).read()
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        assert data.startswith(meta["sender"].encode() + b"-")
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]
    assert store.usage() == store.measure()


def test_concurrent_writers_respect_max_total_size(tmp_path):
    d = str(tmp_path / "q")
    Store(d).ensure_directory()
    # each body is ~50 * len("PID-I|") bytes; a limit for about 40 of 120 attempts
    out = run_writers(d, 4, 30, 40 * 600)
    store = Store(d)
    assert store.measure() <= 40 * 600
    assert sum(ok for ok, _ in out) == len(store.ids())
    assert sum(full for _, full in out) > 0
    assert store.usage() == store.measure()


CRASHER = textwrap.dedent("""
    import io, os, signal, sys
    from scanlib import quarantine
    def die(tmp, final):
        os.kill(os.getpid(), signal.SIGKILL)    # crash after content + meta, before the rename
    quarantine._publish = die
    quarantine.Store(sys.argv[1]).add(io.BytesIO(b"half" * 1000), {"protocol": "ftp"})
""")


def test_crash_before_rename_leaves_no_visible_entry(tmp_path):
    d = str(tmp_path / "q")
    store = Store(d)
    good = store.add(io.BytesIO(b"whole"), {})
    p = subprocess.run([PY, "-c", CRASHER, d], timeout=60)
    assert p.returncode == -9
    assert store.ids() == [good]
    tmps = [n for n in os.listdir(d) if n.startswith(".tmp-")]
    assert len(tmps) == 1                       # the half entry is only a temp folder
    assert sorted(os.listdir(os.path.join(d, tmps[0]))) == ["content", "meta.json"]
    # the lock died with the process: the store goes on working
    store.add(io.BytesIO(b"after"), {})
    assert store.leftovers(older_than=3600) == []
    assert store.remove_leftovers(older_than=0) == [os.path.join(d, tmps[0])]
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


DROPPED_WRITER = textwrap.dedent("""
    import io, os, sys
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    from scanlib.quarantine import Store
    print(Store(sys.argv[1], max_total_size=10**6).add(io.BytesIO(b"from the proxy"), {}))
""")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as two users")
def test_root_cli_leaves_the_store_usable_for_the_proxy_user(tmp_path):
    """What root's CLI creates (ledger, index, rewritten meta) belongs to the
    directory's owner, so the proxies' user can go on adding afterwards."""
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="virusgw-q-")       # pytest's tmp root is 0700
    try:
        os.chmod(base, 0o755)
        d = os.path.join(base, "q")
        os.mkdir(d, 0o750)
        os.chown(d, 65534, 65534)
        store = Store(d, max_total_size=10 ** 6)
        qid = store.add(io.BytesIO(b"by root"), {})
        store.update(qid, lambda m: m.update(state="released"))
        store.recount()
        quarantine.Index(store).sync()
        for name in (".usage", quarantine.INDEX_NAME, qid, os.path.join(qid, "meta.json")):
            assert os.stat(os.path.join(d, name)).st_uid == 65534, name
        p = subprocess.run([PY, "-c", DROPPED_WRITER, d], capture_output=True, timeout=60,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert p.returncode == 0, p.stderr
        new = p.stdout.decode().strip()
        assert store.open_content(new).read() == b"from the proxy"
        assert os.stat(store.path(new)).st_uid == 65534
        assert store.usage() == store.measure() == len(b"by root") + len(b"from the proxy")
    finally:
        shutil.rmtree(base, ignore_errors=True)
