"""Privileges: scanlib.privs.drop and `virusgw setup`.

The drop is tested in forked children (a drop cannot be undone), as root,
to the unprivileged account `make test` creates (VIRUSGW_TEST_USER, with an
extra group VIRUSGW_TEST_GROUP2 to check supplementary groups), and end to
end with the real proxies started as root under socket activation with
`user` set (see test_privs_e2e below).  Everything the dropped user must
read lives in a 0755 folder outside pytest's temp root, which is 0700.
"""

import grp
import os
import pwd
import shutil
import stat
import tempfile

import pytest
from click.testing import CliRunner

from scanlib import privs

TEST_USER = os.environ.get("VIRUSGW_TEST_USER", "virusgw-test")
TEST_GROUP2 = os.environ.get("VIRUSGW_TEST_GROUP2", "virusgw-test2")


def _test_account():
    """(pwd entry, gid of group2) or skip/fail with the reason."""
    if os.geteuid() != 0:
        pytest.skip("privilege drop tests need root")
    try:
        pw = pwd.getpwnam(TEST_USER)
        g2 = grp.getgrnam(TEST_GROUP2).gr_gid
    except KeyError:
        msg = "test account %s/%s missing: run `make testuser` as root" % (TEST_USER, TEST_GROUP2)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return pw, g2


def in_child(fn):
    """Run fn() in a forked child; return what it returned (repr-able data)
    or raise AssertionError with the child's exception text."""
    import pickle
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            try:
                result = ("ok", fn())
            except BaseException as e:  # report everything to the parent
                result = ("err", "%s: %s" % (type(e).__name__, e))
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "err":
        raise AssertionError(value)
    return value


# -- drop() -------------------------------------------------------------------

def test_empty_user_is_a_no_op():
    before = (os.getresuid(), os.getresgid(), sorted(os.getgroups()))
    assert privs.drop("") is False
    assert privs.drop(None) is False
    assert (os.getresuid(), os.getresgid(), sorted(os.getgroups())) == before


def test_unknown_user_is_an_error():
    with pytest.raises(privs.PrivilegeError, match="no such user"):
        privs.drop("no-such-user-virusgw")


def test_drop_as_root_takes_user_groups_and_cannot_come_back():
    pw, g2 = _test_account()

    def child():
        os.setgroups([0, 4, 27])      # root's own supplementary groups must go
        dropped = privs.drop(TEST_USER)
        out = {"dropped": dropped, "resuid": os.getresuid(), "resgid": os.getresgid(),
               "groups": sorted(os.getgroups())}
        for name, call in (("setuid", lambda: os.setuid(0)),
                           ("setgid", lambda: os.setgid(0)),
                           ("setgroups", lambda: os.setgroups([0]))):
            try:
                call()
                out[name] = "succeeded"
            except PermissionError:
                out[name] = "refused"
        with open("/proc/self/status") as f:
            out["caps"] = [line.split()[1] for line in f if line.startswith(("CapPrm", "CapEff"))]
        out["again"] = privs.drop(TEST_USER)     # already that user: no-op
        return out

    out = in_child(child)
    uid, gid = pw.pw_uid, pw.pw_gid
    assert out["dropped"] is True
    assert out["resuid"] == (uid, uid, uid)
    assert out["resgid"] == (gid, gid, gid)
    assert out["groups"] == sorted({gid, g2})
    assert (out["setuid"], out["setgid"], out["setgroups"]) == ("refused",) * 3
    assert out["caps"] == ["0000000000000000"] * 2
    assert out["again"] is False


def test_unprivileged_process_cannot_become_another_user():
    _test_account()

    def child():
        privs.drop(TEST_USER)
        results = []
        for user in ("root", "nobody"):
            try:
                privs.drop(user)
                results.append("no error")
            except privs.PrivilegeError as e:
                results.append(str(e))
        return results

    root_msg, nobody_msg = in_child(child)
    assert "not root" in root_msg
    assert "not root" in nobody_msg


def test_root_as_root_is_a_no_op():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert in_child(lambda: (privs.drop("root"), os.getresuid())) == (False, (0, 0, 0))


def test_check_notices_a_drop_that_did_not_hold():
    """check() itself: a process still able to regain root is refused."""
    _test_account()

    def child():
        pw = pwd.getpwnam(TEST_USER)
        os.setgroups([pw.pw_gid])
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, 0)        # saved uid 0: seteuid-style
        try:
            privs.check(pw.pw_uid, pw.pw_gid, [pw.pw_gid])
        except privs.PrivilegeError as e:
            return str(e)
        return "accepted"

    msg = in_child(child)
    assert "did not hold" in msg and "uids are" in msg


# -- virusgw setup --------------------------------------------------------------

@pytest.fixture
def open_dir():
    """A 0755 folder outside pytest's 0700 temp root (removed afterwards)."""
    d = tempfile.mkdtemp(prefix="virusgw-privs-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _setup(args, env=None):
    from scanlib.cli import main
    return CliRunner().invoke(main, ["setup"] + args, env=env, catch_exceptions=False)


def _conf(directory, user=TEST_USER, group=TEST_GROUP2, log=True):
    path = os.path.join(directory, "virusgw.conf")
    with open(path, "w") as f:
        f.write("user = %s\n" % user)
        if log:
            f.write("[log]\nfile = %s/log/virusgw.log\n" % directory)
        f.write("[spool]\ndirectory = %s/spool\n" % directory)
        f.write("[quarantine]\ndirectory = %s/lib/quarantine\ngroup = %s\n" % (directory, group))
    return path


def _mode_owner(path):
    st = os.lstat(path)
    return (stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name,
            grp.getgrgid(st.st_gid).gr_name)


def test_setup_creates_directories_with_owners_and_modes(open_dir):
    pw, _ = _test_account()
    conf = _conf(open_dir)
    cache = os.path.join(open_dir, "cache")
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": cache})
    assert r.exit_code == 0, r.output
    assert _mode_owner(open_dir + "/spool") == (0o700, TEST_USER, TEST_USER)
    assert _mode_owner(open_dir + "/lib/quarantine") == (0o2750, TEST_USER, TEST_GROUP2)
    assert _mode_owner(open_dir + "/lib") == (0o755, "root", "root")
    assert _mode_owner(cache) == (0o700, TEST_USER, TEST_USER)
    assert _mode_owner(open_dir + "/log/virusgw.log") == (0o640, TEST_USER, TEST_USER)
    assert r.output.count("created") == 4
    # Idempotent: a second run changes nothing and says so.
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": cache})
    assert r.exit_code == 0
    assert [line.split()[-1] for line in r.output.splitlines()] == ["ok"] * 4


def test_setup_fixes_owner_and_mode(open_dir):
    _test_account()
    conf = _conf(open_dir, log=False)
    os.makedirs(open_dir + "/spool", mode=0o777)
    os.chmod(open_dir + "/spool", 0o777)
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0, r.output
    assert "owner was root:root" in r.output and "mode was 0777" in r.output
    assert _mode_owner(open_dir + "/spool") == (0o700, TEST_USER, TEST_USER)


def test_setup_quarantine_is_setgid_with_a_group_only(open_dir):
    """With [quarantine] group the directory is 02750: what the proxies'
    user creates in it gets that group even from a process that is not in
    the group (the child below drops every supplementary group), so the
    administrators can read it.  Without a group: plain 0750.  An existing
    0750 directory is fixed."""
    pw, g2 = _test_account()
    os.makedirs(open_dir + "/lib/quarantine", mode=0o750)
    os.chmod(open_dir + "/lib/quarantine", 0o750)
    conf = _conf(open_dir, log=False)
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0, r.output
    assert "mode was 0750" in r.output
    quarantine = open_dir + "/lib/quarantine"
    assert _mode_owner(quarantine) == (0o2750, TEST_USER, TEST_GROUP2)

    def child():
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        assert g2 not in os.getgroups() and os.getgid() != g2
        os.mkdir(quarantine + "/entry", 0o750)
        fd = os.open(quarantine + "/entry/content", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.close(fd)
        return [os.stat(quarantine + p).st_gid for p in ("/entry", "/entry/content")]

    assert in_child(child) == [g2, g2]

    other = os.path.join(open_dir, "nogroup")
    os.mkdir(other, 0o755)
    conf = _conf(other, group="", log=False)
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0, r.output
    assert _mode_owner(other + "/lib/quarantine") == (0o750, TEST_USER, TEST_USER)


def test_setup_dry_run_changes_nothing(open_dir):
    _test_account()
    conf = _conf(open_dir)
    r = _setup(["-c", conf, "--dry-run"], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0, r.output
    assert "(dry run)" in r.output
    assert sorted(os.listdir(open_dir)) == ["virusgw.conf"]


def test_setup_refuses_a_symlink(open_dir):
    _test_account()
    conf = _conf(open_dir, log=False)
    os.mkdir(open_dir + "/elsewhere", 0o755)
    os.symlink(open_dir + "/elsewhere", open_dir + "/spool")
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 1
    assert "spool %s/spool is a symlink: refusing to follow it" % open_dir in r.output
    assert _mode_owner(open_dir + "/elsewhere") == (0o755, "root", "root")
    # The other directories were still made.
    assert _mode_owner(open_dir + "/lib/quarantine")[1] == TEST_USER


def test_setup_unknown_user_is_a_config_error(open_dir):
    conf = _conf(open_dir, user="no-such-user-virusgw", log=False)
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 78
    assert "user 'no-such-user-virusgw' does not exist" in r.output
    assert sorted(os.listdir(open_dir)) == ["virusgw.conf"]


def test_setup_warns_when_a_parent_is_closed(open_dir):
    _test_account()
    os.mkdir(open_dir + "/closed", 0o700)
    conf = _conf(open_dir + "/closed", log=False)
    r = _setup(["-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0
    assert "warning: user %s cannot reach %s/closed/spool: %s/closed is closed to it" % (
        TEST_USER, open_dir, open_dir) in r.output


# -- end to end: the real proxies, started as root, drop to the test user --------

def _readable_by_test_user(paths):
    """Can the dropped user reach the code it imports after the drop?"""
    def child():
        privs.drop(TEST_USER)
        return [p for p in paths if not os.access(p, os.R_OK)]
    return in_child(child)


@pytest.fixture
def dropped_env(open_dir, clamd):
    """A config with user = TEST_USER in a folder that user can read, its
    directories made by `virusgw setup`; clamd over TCP (the fixture's unix
    socket lives under pytest's 0700 temp root)."""
    pw, g2 = _test_account()
    from tests.rig.activate import REPO
    import smtpproxy
    import ftpproxy
    import scanlib
    code = [os.path.join(REPO, ".venv", "bin", "python"),
            os.path.dirname(scanlib.__file__), os.path.dirname(smtpproxy.__file__),
            os.path.dirname(ftpproxy.__file__)]
    blocked = _readable_by_test_user(code)
    if blocked:
        pytest.skip("the checkout is not readable by %s (%s): the dropped proxy could not "
                    "import its modules" % (TEST_USER, ", ".join(blocked)))
    env = {"VIRUSGW_CACHE_DIR": os.path.join(open_dir, "cache")}

    def make(text):
        conf = os.path.join(open_dir, "virusgw.conf")
        with open(conf, "w") as f:
            f.write("user = %s\n" % TEST_USER)
            f.write("[log]\nfile = %s/log/virusgw.log\nlevel = debug\n" % open_dir)
            f.write("[spool]\ndirectory = %s/spool\n" % open_dir)
            f.write("[quarantine]\ndirectory = %s/quarantine\ngroup = %s\n"
                    % (open_dir, TEST_GROUP2))
            f.write("[scanner]\nclamd = %s\nmethod = stream\ntimeout = 20\n" % clamd.tcp_endpoint)
            f.write(text)
        r = _setup(["-c", conf], env=env)
        assert r.exit_code == 0, r.output
        return conf
    make.env = env
    make.dir = open_dir
    make.uid, make.gid, make.g2 = pw.pw_uid, pw.pw_gid, g2
    return make


def _assert_dropped(pid, env):
    from tests.rig import procs
    st = procs.status(pid)
    assert st["Uid"] == [env.uid] * 4
    assert st["Gid"] == [env.gid] * 4
    assert sorted(st["Groups"]) == sorted({env.gid, env.g2})
    assert st["CapEff"] == 0 and st["CapPrm"] == 0


def _quarantine_entries(directory):
    return sorted(n for n in os.listdir(directory) if not n.startswith("."))


def test_smtp_proxy_started_as_root_drops_and_works(dropped_env):
    import base64
    import smtplib
    import socket
    from aiosmtpd.controller import Controller
    from tests.rig import procs
    from tests.rig.activate import activated, free_port, proxy_argv, wait_until
    from tests.rig.clamd import EICAR

    got = []

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            got.append(envelope.original_content)
            return "250 2.0.0 stored"

    sink = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    sink.start()
    try:
        conf = dropped_env("[smtp]\nupstream = smtp:127.0.0.1:%d\naction = quarantine\n"
                           "local_domains = example.com\n" % sink.port)
        with activated(proxy_argv("virusgw-smtpproxy", conf), env=dropped_env.env) as hp:
            # While a session is open: the proxy process is the test user.
            s = socket.create_connection(hp, timeout=20)
            assert s.recv(512).startswith(b"220 ")
            pids = wait_until(lambda: procs.server_pids(s), timeout=10, what="proxy pid")
            assert len(pids) == 1
            _assert_dropped(pids[0], dropped_env)
            s.sendall(b"QUIT\r\n")
            assert s.recv(512).startswith(b"221 ")
            s.close()
            # And it does its whole job as that user: spool, clamd, quarantine, log.
            with smtplib.SMTP(hp[0], hp[1], timeout=30) as c:
                c.sendmail("a@example.org", ["b@example.com"],
                           b"Subject: clean\r\n\r\nhello\r\n")
                msg = (b"Subject: infected\r\nMIME-Version: 1.0\r\n"
                       b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
                       b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
                       b"--XX\r\nContent-Type: application/octet-stream\r\n"
                       b"Content-Transfer-Encoding: base64\r\n\r\n"
                       + base64.encodebytes(EICAR).replace(b"\n", b"\r\n")
                       + b"--XX--\r\n")
                c.sendmail("a@example.org", ["b@example.com"], msg)
    finally:
        sink.stop()
    assert len(got) == 2 and b"hello" in got[0] and EICAR not in got[1]
    qdir = os.path.join(dropped_env.dir, "quarantine")
    entries = _quarantine_entries(qdir)
    assert len(entries) == 1
    st = os.stat(os.path.join(qdir, entries[0], "content"))
    assert (st.st_uid, st.st_gid) == (dropped_env.uid, dropped_env.g2)
    assert os.listdir(os.path.join(dropped_env.dir, "spool")) == []
    log = os.path.join(dropped_env.dir, "log", "virusgw.log")
    assert os.stat(log).st_uid == dropped_env.uid
    with open(log) as f:
        assert "action=quarantine" in f.read()


def test_ftp_proxy_started_as_root_drops_and_works(dropped_env, open_dir):
    import ftplib
    import io
    import random
    from tests.rig import procs
    from tests.rig.activate import activated, proxy_argv, wait_until
    from tests.rig.clamd import EICAR
    from tests.rig.ftp import PyFtpd

    root = os.path.join(open_dir, "ftproot")
    os.mkdir(root)
    with PyFtpd(root) as ftpd:
        base = random.randrange(35000, 37800)
        conf = dropped_env("[ftp]\nupstream = tcp:127.0.0.1:%d\naction = quarantine\n"
                           "passive_ports = %d-%d\ntimeout = 30\ndata_timeout = 10\n"
                           % (ftpd.port, base, base + 99))
        with activated(proxy_argv("virusgw-ftpproxy", conf), env=dropped_env.env) as hp:
            f = ftplib.FTP()
            f.connect(hp[0], hp[1], timeout=20)
            pids = wait_until(lambda: procs.server_pids(f.sock), timeout=10, what="proxy pid")
            assert len(pids) == 1
            _assert_dropped(pids[0], dropped_env)
            f.login("user", "secret")
            f.storbinary("STOR clean.txt", io.BytesIO(b"clean\n"))
            with pytest.raises(ftplib.error_perm) as e:
                f.storbinary("STOR eicar.com", io.BytesIO(EICAR))
            assert str(e.value).startswith("55")
            f.quit()
    assert sorted(os.listdir(root)) == ["clean.txt"]
    entries = _quarantine_entries(os.path.join(dropped_env.dir, "quarantine"))
    assert len(entries) == 1
    st = os.stat(os.path.join(dropped_env.dir, "quarantine", entries[0], "content"))
    assert st.st_uid == dropped_env.uid


@pytest.mark.parametrize("program", ["virusgw-smtpproxy", "virusgw-ftpproxy"])
def test_failed_drop_answers_421_and_nothing_else(dropped_env, program):
    import socket
    from tests.rig.activate import activated, proxy_argv
    conf = dropped_env("")
    with open(conf) as f:
        text = f.read()
    with open(conf, "w") as f:
        f.write(text.replace("user = %s\n" % TEST_USER, "user = no-such-user-virusgw\n"))
    with activated(proxy_argv(program, conf), env=dropped_env.env) as hp:
        s = socket.create_connection(hp, timeout=20)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
    assert data.startswith(b"421") and data.count(b"\r\n") == 1, data


def test_setup_warns_when_user_is_empty(open_dir):
    """With user empty, setup (as root) says the directories go to root and
    that the shipped units run the proxies as 'virusgw'."""
    _test_account()
    conf = os.path.join(open_dir, "empty-user.conf")
    with open(conf, "w") as f:
        f.write("[spool]\ndirectory = %s/spool\n[quarantine]\ndirectory = %s/q\n"
                % (open_dir, open_dir))
    r = _setup(["-c", conf, "--dry-run"], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 0
    assert "'user' is empty" in r.output and "user = virusgw" in r.output
    r = _setup(["-c", _conf(open_dir), "--dry-run"], env={"VIRUSGW_CACHE_DIR": ""})
    assert "'user' is empty" not in r.output
