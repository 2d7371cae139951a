"""Looking at per-connection processes from a test, through /proc.

server_pids(sock): the processes whose fd 0 is the server end of a client
socket we hold (i.e. the proxy spawned for that connection), so a test can
read its uid/gids; status(pid): its Uid/Gid/Groups; matching(text): the
processes whose command line contains text (a test's private config path
makes it unique), for "the per-connection process count is back to zero".
"""

import os


def _inodes(local_port, remote_port):
    """Socket inodes with this local and remote port (any address)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    lport = int(parts[1].rsplit(":", 1)[1], 16)
                    rport = int(parts[2].rsplit(":", 1)[1], 16)
                    if lport == local_port and rport == remote_port and parts[9] != "0":
                        found.add(parts[9])
        except OSError:
            pass
    return found


def _pids():
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def server_pids(sock):
    """PIDs whose stdin is the server end of the connected socket sock."""
    lport = sock.getsockname()[1]
    rport = sock.getpeername()[1]
    inodes = {"socket:[%s]" % i for i in _inodes(rport, lport)}
    pids = []
    for pid in _pids():
        try:
            if os.readlink("/proc/%d/fd/0" % pid) in inodes:
                pids.append(pid)
        except OSError:
            continue
    return pids


def status(pid):
    """{'Uid': [r, e, s, fs], 'Gid': [...], 'Groups': [...]} of pid."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                out[key] = [int(v) for v in value.split()]
            elif key in ("CapPrm", "CapEff"):
                out[key] = int(value.strip(), 16)
    return out


def matching(text):
    """PIDs (not zombies) whose command line contains text."""
    text = text.encode() if isinstance(text, str) else text
    pids = []
    for pid in _pids():
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmd = f.read()
            with open("/proc/%d/stat" % pid, "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != b"Z":
            pids.append(pid)
    return pids


def children(ppid):
    """[(pid, state)] of the direct children of ppid (state 'Z': a zombie
    its parent has not reaped yet)."""
    out = []
    for pid in _pids():
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append((pid, fields[0].decode()))
    return out


def listening(port):
    """Is anything listening on TCP port (any address)?  Read from
    /proc/net/tcp{,6}, so checking does not make a connection."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False
