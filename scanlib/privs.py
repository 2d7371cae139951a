"""Dropping root: one all-or-nothing chain, then a check that it held.

drop(user) is called by both proxies after they have loaded their
configuration and before they read a byte from the client.  Started as
root with `user` set, the process takes that user's groups (primary and
supplementary, from the group database, replacing root's), its gid and its
uid -- real, effective and saved -- and then checks that it cannot get
root back.  Any failure raises PrivilegeError: the caller refuses service
(421) rather than run with more privilege than the administrator asked for.

With `user` empty, or when the process already runs as that user (e.g. a
systemd unit with User=), drop() does nothing.  A process that is neither
root nor that user cannot become it: that is a PrivilegeError too.

What this module does not do: seteuid() impersonation (a saved uid of 0
could be taken back by anyone who subverts the process), chroot, or
creating directories (that is `virusgw setup`, an install step).
"""

import os


class PrivilegeError(Exception):
    """The privilege drop could not be done or did not hold."""


def drop(user):
    """Drop to `user` and its groups when running as root.

    Returns True when it dropped, False when there was nothing to do
    (user empty, or already that user).  Raises PrivilegeError.
    """
    if not user:
        return False
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError("no such user: %r" % user)
    uid, gid = pw.pw_uid, pw.pw_gid
    if os.getresuid() == (uid, uid, uid) and os.getresgid() == (gid, gid, gid):
        return False
    if os.geteuid() != 0:
        raise PrivilegeError("cannot become user %r (uid %d): running as uid %d, not root"
                             % (user, uid, os.geteuid()))
    if uid == 0:
        # user = root while running as root with odd gids: nothing to drop to.
        raise PrivilegeError("user %r has uid 0: that is not a drop" % user)
    try:
        # Order matters: groups and gid while still root, uid last.
        os.setgroups(_grouplist(pw.pw_name, gid))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise PrivilegeError("dropping to %r (uid %d, gid %d) failed: %s" % (user, uid, gid, e))
    check(uid, gid, _grouplist(pw.pw_name, gid))
    return True


def _grouplist(name, gid):
    """The user's groups from the group database, primary gid first."""
    try:
        groups = os.getgrouplist(name, gid)
    except OSError as e:
        raise PrivilegeError("cannot read the groups of %r: %s" % (name, e))
    return [gid] + sorted(set(groups) - {gid})


def check(uid, gid, groups):
    """Raise PrivilegeError unless the process is exactly uid/gid/groups
    and can neither take uid 0 or gid 0 back nor holds any capability."""
    problems = []
    if os.getresuid() != (uid, uid, uid):
        problems.append("uids are %r, expected %d" % (os.getresuid(), uid))
    if os.getresgid() != (gid, gid, gid):
        problems.append("gids are %r, expected %d" % (os.getresgid(), gid))
    if set(os.getgroups()) != set(groups):
        problems.append("groups are %r, expected %r" % (sorted(os.getgroups()), sorted(groups)))
    if uid != 0:
        for name, call in (("setuid(0)", lambda: os.setuid(0)),
                           ("seteuid(0)", lambda: os.seteuid(0)),
                           ("setgid(0)", lambda: os.setgid(0)),
                           ("setgroups([0])", lambda: os.setgroups([0]))):
            if gid == 0 and name == "setgid(0)":
                continue
            try:
                call()
            except OSError:
                continue
            problems.append("%s succeeded after the drop" % name)
        caps = _capabilities()
        for field, value in sorted(caps.items()):
            if value:
                problems.append("%s is %x, expected 0" % (field, value))
    if problems:
        raise PrivilegeError("privilege drop did not hold: " + "; ".join(problems))


def _capabilities():
    """CapPrm/CapEff/CapAmb from /proc/self/status ({} where unreadable)."""
    caps = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("CapPrm", "CapEff", "CapAmb"):
                    caps[key] = int(value.strip(), 16)
    except (OSError, ValueError):
        return {}
    return caps
