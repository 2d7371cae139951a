"""The peers: the gateways users run today, run privately for the bench.

ClamSMTP (Debian's clamsmtp 1.10) and amavisd-new (Debian's 2.13), each
installed by the bench itself (apt-get, noninteractive, only when missing:
`make test` never installs them), each with its own config in a temp
folder, pointed at the bench's private clamd and at the bench's sink,
started in the foreground and stopped by PID.  Nothing under /etc is read
or written; Debian's policy-rc.d keeps the packages' own services from
starting, and we never start them.

Each peer is configured the way the Debian package ships it, except for
what must be private (ports, sockets, folders) and what would need the
network or a spam engine (amavis: spam checks off, as with no SpamAssassin
installed; no DKIM; no notifications).  amavis keeps Debian's default
$max_servers = 2.
"""

import os
import pwd
import shutil
import signal
import subprocess
import time

PACKAGES = ("clamsmtp", "amavisd-new")


def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return b"install ok installed" in r.stdout


def ensure_installed(log):
    """apt-get install the peers that are missing.  Returns {pkg: None or
    the reason it is not available}."""
    missing = [p for p in PACKAGES if not installed(p)]
    status = {p: None for p in PACKAGES}
    if not missing:
        return status
    if os.geteuid() != 0:
        for p in missing:
            status[p] = "not installed and not root (apt-get install %s)" % p
        return status
    log("installing peers with apt-get: %s" % " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300",
           "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
    r = subprocess.run(cmd + missing, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = subprocess.run(cmd + missing, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    for p in missing:
        if not installed(p):
            status[p] = "apt-get install %s failed: %s" % (
                p, r.stdout.decode("utf-8", "replace").strip().splitlines()[-1:])
    return status


def _listening(port):
    hexport = ":%04X" % port
    with open("/proc/net/tcp") as f:
        next(f)
        return any(line.split()[1].endswith(hexport) and line.split()[3] == "0A" for line in f)


def _wait_listen(port, proc, timeout, what, logfile):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("%s exited %s: %s" % (what, proc.returncode, _tail(logfile)))
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError("%s did not listen within %ss: %s" % (what, timeout, _tail(logfile)))


def _tail(path, n=6):
    try:
        with open(path, "rb") as f:
            return " | ".join(f.read()[-3000:].decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Peer:
    name = "?"
    proc = None

    def stop(self):
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)


class ClamSMTP(Peer):
    """clamsmtpd -d 1 (foreground) with its own config."""
    name = "clamsmtp"

    def __init__(self, workdir, port, sink_port, clamd_socket):
        self.dir = os.path.join(workdir, "clamsmtp")
        self.port = port
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        self.conf = os.path.join(self.dir, "clamsmtpd.conf")
        self.log = os.path.join(self.dir, "clamsmtpd.log")
        with open(self.conf, "w") as f:
            f.write("OutAddress: 127.0.0.1:%d\n"
                    "Listen: 127.0.0.1:%d\n"
                    "ClamAddress: %s\n"
                    "TempDirectory: %s\n"
                    "PidFile: %s\n"
                    # Debian ships MaxConnections 64 (the default); the 50-session
                    # load fits.  Header as in Debian's example.
                    "MaxConnections: 64\n"
                    "TimeOut: 180\n"
                    "Header: X-Virus-Scanned: ClamAV using ClamSMTP\n"
                    % (sink_port, port, clamd_socket, os.path.join(self.dir, "tmp"),
                       os.path.join(self.dir, "clamsmtpd.pid")))

    def start(self):
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["/usr/sbin/clamsmtpd", "-d", os.environ.get("BENCH_CLAMSMTP_DEBUG", "1"), "-f", self.conf],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_listen(self.port, self.proc, 20, "clamsmtpd", self.log)
        return self


AMAVIS_CONF = r"""use strict;
# amavisd-new for the virusgw bench: Debian's defaults except what must be
# private (folders, ports, the clamd socket) and what needs the network.
$MYHOME = '%(home)s';
$TEMPBASE = "$MYHOME/tmp";
$db_home = "$MYHOME/db";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$QUARANTINEDIR = undef;
$daemon_user = 'amavis';
$daemon_group = 'amavis';
$mydomain = 'bench.test';
$myhostname = 'amavis.bench.test';
$max_servers = 2;
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = %(port)d;
@inet_acl = qw(127.0.0.1);
$forward_method = 'smtp:[127.0.0.1]:%(sink)d';
$notify_method = $forward_method;
$DO_SYSLOG = 0;
$LOGFILE = "$MYHOME/amavis.log";
$log_level = 0;
$enable_db = 0;
$enable_global_cache = 0;
$enable_dkim_verification = 0;
$enable_dkim_signing = 0;
@bypass_spam_checks_maps = (1);
@local_domains_maps = (1);
$final_virus_destiny = D_DISCARD;
$final_banned_destiny = D_DISCARD;
$final_spam_destiny = D_PASS;
$final_bad_header_destiny = D_PASS;
$warnvirussender = 0; $warnbannedsender = 0; $warnbadhsender = 0;
$virus_admin = undef; $spam_admin = undef; $banned_admin = undef;
$MAXLEVELS = 14;
$MAXFILES = 1500;
$MIN_EXPANSION_QUOTA = 100*1024;
$MAX_EXPANSION_QUOTA = 2000*1024*1024;
@av_scanners = (
  ['ClamAV-clamd', \&ask_daemon, ["CONTSCAN {}\n", "%(clamd)s"],
   qr/\bOK$/m, qr/\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ],
);
@av_scanners_backup = ();
1;
"""


class Amavis(Peer):
    """amavisd foreground with its own config.  amavisd refuses a config
    in a folder its user can write, so the config lives in a root-owned
    folder and MYHOME in an amavis-owned one."""
    name = "amavis"

    def __init__(self, workdir, port, sink_port, clamd_socket):
        self.port = port
        self.home = os.path.join(workdir, "amavis-home")
        confdir = os.path.join(workdir, "amavis-conf")
        for d in ("tmp", "db", "var"):
            os.makedirs(os.path.join(self.home, d), exist_ok=True)
        os.makedirs(confdir, exist_ok=True)
        pw = pwd.getpwnam("amavis")
        for root, dirs, _files in os.walk(self.home):
            os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(confdir, 0o755)
        self.conf = os.path.join(confdir, "amavisd.conf")
        with open(self.conf, "w") as f:
            f.write(AMAVIS_CONF % {"home": self.home, "port": port, "sink": sink_port,
                                   "clamd": clamd_socket})
        os.chmod(self.conf, 0o644)
        self.log = os.path.join(self.home, "amavis.log")
        self.out = os.path.join(confdir, "amavisd.out")
        # amavis runs as its own user: it must pass through the bench's
        # temp folder (mkdtemp makes it 0700) to its home and to clamd's
        # socket.  Search permission only, and only on our own folder.
        st = os.stat(workdir)
        os.chmod(workdir, st.st_mode | 0o001)

    def start(self):
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(["/usr/sbin/amavisd", "-c", self.conf, "foreground"],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_listen(self.port, self.proc, 60, "amavisd", self.out)
        return self

    def stop(self):
        # The master (our Popen) takes its pre-forked children down with it.
        Peer.stop(self)


def cleanup(path):
    shutil.rmtree(path, ignore_errors=True)
