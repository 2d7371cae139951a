"""`virusgw setup`: the install step that makes the directories the proxies
need, with the owners and modes the configured `user` (and quarantine
`group`) require.

The proxies never create these as root at run time: they start as root
(under inetd) or as the unit's user, drop privileges before reading input,
and from then on can only use what this step prepared.

    [spool] directory       user:user's group   0700
    [quarantine] directory  user:[quarantine] group   02750 (setgid)
                            (no group: user's group    0750)
    /var/cache/virusgw      user:user's group   0700  (the validated-config cache)
    [log] file              user:user's group   0640  (created empty when missing)

Missing parent directories are created root-owned 0755.  An existing path
that is a symlink or not a directory (not a regular file, for the log) is
refused, never followed.  With `user` empty, the owner is whoever runs
setup.  Setup also warns when the user could not reach a directory because
a parent folder is closed to it.

The quarantine directory is setgid when [quarantine] group is set, so that
what the proxies create in it gets that group (and stays readable by the
administrators) even when the proxies' user is not a member of it; the
store (scanlib.quarantine) makes its directories the same way.

What this module does not do: create the user or group (adduser does),
write /etc/virusgw.conf, or touch anything else.
"""

import grp
import os
import pwd
import stat
import sys

import click

from scanlib.cli import config_option, load_config, ExitCode

FAILED = 1
CACHE_DIR = "/var/cache/virusgw"


class SetupError(Exception):
    pass


def plan(conf, cache_dir=None):
    """[(what, path, kind, uid, gid, mode)] for this configuration.
    kind: 'dir' or 'file'.  Raises SetupError for an unknown user/group."""
    user = conf.get("user") or ""
    if user:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise SetupError("user %r does not exist (create it first, e.g. "
                             "adduser --system --group --no-create-home %s)" % (user, user))
        uid, gid = pw.pw_uid, pw.pw_gid
    else:
        uid, gid = os.getuid(), os.getgid()
    qgroup = conf["quarantine"].get("group") or ""
    if qgroup:
        try:
            qgid = grp.getgrnam(qgroup).gr_gid
        except KeyError:
            raise SetupError("[quarantine] group %r does not exist" % qgroup)
        qmode = 0o2750
    else:
        qgid, qmode = gid, 0o750
    if cache_dir is None:
        from scanlib import config
        cache_dir = os.environ.get("VIRUSGW_CACHE_DIR",
                                   getattr(config, "DEFAULT_CACHE_DIR", CACHE_DIR))
    items = [
        ("spool", conf["spool"]["directory"], "dir", uid, gid, 0o700),
        ("quarantine", conf["quarantine"]["directory"], "dir", uid, qgid, qmode),
    ]
    if cache_dir:
        items.append(("cache", cache_dir, "dir", uid, gid, 0o700))
    logfile = conf.get("log", {}).get("file") or ""
    if logfile:
        items.append(("log", logfile, "file", uid, gid, 0o640))
    return [(w, os.path.abspath(p), k, u, g, m) for (w, p, k, u, g, m) in items]


def apply(item, dry_run=False):
    """Create or fix one item; returns a one-line report.  Raises SetupError.
    Owner and mode are changed through a descriptor opened with O_NOFOLLOW,
    so a symlink swapped in never redirects them."""
    what, path, kind, uid, gid, mode = item
    actions = []
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise SetupError("%s %s: %s" % (what, path, e.strerror))
    if st is not None:
        _check_type(what, path, kind, st)
    try:
        if st is None:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                actions.append("made parent %s" % parent)
                if not dry_run:
                    os.makedirs(parent, mode=0o755, exist_ok=True)
            actions.append("created")
            if dry_run:
                return _report(item, actions, dry_run)
            if kind == "dir":
                os.mkdir(path, 0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                                 0o600))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        if kind == "dir":
            flags |= os.O_DIRECTORY
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            _check_type(what, path, kind, st)
            if (st.st_uid, st.st_gid) != (uid, gid):
                if "created" not in actions:
                    actions.append("owner was %s" % _owner(st.st_uid, st.st_gid))
                if not dry_run:
                    os.fchown(fd, uid, gid)
            if stat.S_IMODE(st.st_mode) != mode:
                if "created" not in actions:
                    actions.append("mode was %04o" % stat.S_IMODE(st.st_mode))
                if not dry_run:
                    os.fchmod(fd, mode)
        finally:
            os.close(fd)
    except PermissionError as e:
        raise SetupError("%s %s: %s (run virusgw setup as root)" % (what, path, e.strerror))
    except OSError as e:
        raise SetupError("%s %s: %s" % (what, path, e.strerror))
    return _report(item, actions, dry_run)


def _check_type(what, path, kind, st):
    if stat.S_ISLNK(st.st_mode):
        raise SetupError("%s %s is a symlink: refusing to follow it" % (what, path))
    want = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
    if not want(st.st_mode):
        raise SetupError("%s %s exists and is not a %s" %
                         (what, path, "directory" if kind == "dir" else "regular file"))


def _report(item, actions, dry_run):
    what, path, kind, uid, gid, mode = item
    state = ", ".join(actions) if actions else "ok"
    return "%-10s %s  %s %04o  %s%s" % (what, path, _owner(uid, gid), mode, state,
                                         " (dry run)" if dry_run and actions else "")


def _owner(uid, gid):
    try:
        u = pwd.getpwuid(uid).pw_name
    except KeyError:
        u = str(uid)
    try:
        g = grp.getgrgid(gid).gr_name
    except KeyError:
        g = str(gid)
    return "%s:%s" % (u, g)


def unreachable(path, uid):
    """The first ancestor of path that uid cannot search (None if all can)."""
    if uid == 0:
        return None
    try:
        pw = pwd.getpwuid(uid)
        groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except (KeyError, OSError):
        groups = set()
    d = os.path.dirname(path)
    ancestors = []
    while True:
        ancestors.append(d)
        if d == os.path.dirname(d):
            break
        d = os.path.dirname(d)
    for a in reversed(ancestors):
        try:
            st = os.stat(a)
        except OSError:
            continue
        if st.st_uid == uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return a
    return None


@click.command("setup")
@config_option
@click.option("-n", "--dry-run", is_flag=True, help="Show what would be done; change nothing.")
def setup(config_path, dry_run):
    """Create the spool, quarantine and cache directories (and the log file)
    with the owners and modes the configured user needs.  Run as root once
    after installing and after changing user, group or directories."""
    conf = load_config(config_path)
    if not conf.get("user") and os.geteuid() == 0:
        # The shipped inetd lines and units run the proxies as 'virusgw':
        # root-owned directories would make them answer 451 to every message.
        click.echo("virusgw setup: warning: 'user' is empty, so the directories will belong "
                   "to root; set user = virusgw (the account the shipped inetd lines and "
                   "units run the proxies as)", err=True)
    try:
        items = plan(conf)
    except SetupError as e:
        click.echo("virusgw setup: %s" % e, err=True)
        sys.exit(ExitCode.CONFIG)
    failed = False
    for item in items:
        try:
            click.echo(apply(item, dry_run=dry_run))
        except SetupError as e:
            click.echo("virusgw setup: %s" % e, err=True)
            failed = True
            continue
        blocked = unreachable(item[1], item[3])
        if blocked:
            click.echo("virusgw setup: warning: user %s cannot reach %s: %s is closed to it"
                       % (_owner(item[3], item[4]).split(":")[0], item[1], blocked), err=True)
    sys.exit(FAILED if failed else ExitCode.OK)
