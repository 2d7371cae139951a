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
    assert _mode_owner(open_dir + "/lib/quarantine") == (0o750, TEST_USER, TEST_GROUP2)
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
    r = CliRunner().invoke(__import__("scanlib.cli", fromlist=["main"]).main,
                           ["setup", "-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
    assert r.exit_code == 1
    assert "spool %s/spool is a symlink: refusing to follow it" % open_dir in r.output
    assert _mode_owner(open_dir + "/elsewhere") == (0o755, "root", "root")
    # The other directories were still made.
    assert _mode_owner(open_dir + "/lib/quarantine")[1] == TEST_USER


def test_setup_unknown_user_is_a_config_error(open_dir):
    conf = _conf(open_dir, user="no-such-user-virusgw", log=False)
    r = CliRunner().invoke(__import__("scanlib.cli", fromlist=["main"]).main,
                           ["setup", "-c", conf], env={"VIRUSGW_CACHE_DIR": ""})
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
