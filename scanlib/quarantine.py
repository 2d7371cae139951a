"""The quarantine store: `<directory>/<ID>/content` + `<directory>/<ID>/meta.json`.

What it guarantees:
- IDs are made here (UTC time to the microsecond, then 48 random bits:
  `20261203-171012-123456-3f9a1c2b7d8e`), so they sort by time.  Every ID
  that comes from outside (the CLI's arguments) is checked against ID_RE
  with fullmatch before any path is joined; nothing from the network (file
  names, addresses, subjects) ever becomes a path: it is only JSON in
  meta.json.
- add() writes an entry in a private temp folder (`.tmp-*`) inside the
  quarantine directory (same filesystem), fsyncs it, and renames it into
  place: a reader sees a whole entry or none.  A crash leaves only a
  `.tmp-*` folder that list() ignores and purge() removes.
- Many proxy processes may add at once: the size check and the rename happen
  under an flock on the quarantine directory, and `max_total_size` (bytes of
  content, 0 = unlimited) is kept in the ledger `<directory>/.usage`, which
  purge() and reindex recompute from the files.  A full store or any write
  failure raises QuarantineError: the caller then refuses temporarily and
  delivers nothing.
- Permissions: directories 0750, files 0640, group set to `group` when
  given (the administrators' group); nothing is readable by others.  What
  root's CLI creates in the store goes to the directory's owner (the
  proxies' user).  Entries and their files are opened without following
  symlinks, so a planted link never makes root read or write elsewhere.
- meta.json: what the caller gave (DESIGN.md "Quarantine store": protocol,
  direction, client, sender, recipients, subject, message_id, ftp_*,
  filename, viruses, action, reason, rule, scanner_version, portion,
  content_type; bytes decoded, anything else made JSON-safe) plus what the
  store computes: id, created (UTC), size, sha256, state ('quarantined',
  'blocked' for keep_blocked copies, 'released') and history (one event
  per release attempt: who, when, to, the upstream's answers, released).

The files are the source of truth.  The list index (Index below, SQLite,
only the CLI uses it) is a cache kept consistent with them and rebuildable.
What this module does not do: import click or the scanner (sqlite3 only in
Index), talk to the network.  The proxies import it only when something is
quarantined.
"""

import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time

ID_RE = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9]{6}-[0-9a-f]{12}")
ID_LEN = 35
TMP_PREFIX = ".tmp-"
DEL_PREFIX = ".del-"
USAGE_NAME = ".usage"
CONTENT = "content"
META = "meta.json"
DIR_MODE = 0o750
FILE_MODE = 0o640
STATES = ("quarantined", "blocked", "released")

# meta keys the store computes itself; a caller's values for them are ignored
COMPUTED = ("id", "created", "size", "sha256", "state", "history")
# meta keys the proxies give (DESIGN.md "Quarantine store"); others are kept too
KNOWN = ("protocol", "direction", "client", "sender", "recipients", "subject",
         "message_id", "ftp_user", "ftp_server", "ftp_path", "filename", "viruses",
         "action", "reason", "rule", "scanner_version", "portion", "content_type")
LIST_KEYS = ("recipients", "viruses")

_CHUNK = 1 << 16


class QuarantineError(Exception):
    """The store could not take or change an entry (full, disk, permissions)."""


class NotFound(QuarantineError):
    """No entry with that ID."""


class BadID(QuarantineError, ValueError):
    """Not a well-formed quarantine ID (refused before any path is built)."""


def check_id(qid):
    """The ID as str if it is well formed, else BadID.  Never builds a path."""
    if not isinstance(qid, str) or len(qid) != ID_LEN or not ID_RE.fullmatch(qid):
        shown = repr(qid)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        raise BadID("not a quarantine ID: %s" % shown)
    return qid


def new_id(now=None):
    """A fresh time-sortable ID (UTC)."""
    t = datetime.datetime.now(datetime.timezone.utc) if now is None else now
    return "%s-%s" % (t.strftime("%Y%m%d-%H%M%S-%f"), os.urandom(6).hex())


def id_time(qid):
    """The UTC datetime encoded in a (checked) ID."""
    check_id(qid)
    return datetime.datetime.strptime(qid[:22], "%Y%m%d-%H%M%S-%f").replace(
        tzinfo=datetime.timezone.utc)


def utc_text(t=None):
    """ISO 8601 UTC with microseconds and a Z, as stored in meta.json."""
    t = datetime.datetime.now(datetime.timezone.utc) if t is None else t
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _clean(value):
    """Make a value from the network JSON-safe: bytes are decoded (invalid
    bytes shown as \\xNN), containers recursed, anything else str()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(_clean(k)): _clean(v) for k, v in value.items()}
    return str(value)


def initial_state(meta):
    """'quarantined' for held items (action quarantine), 'blocked' for the
    keep_blocked copies of what reject/discard/delete/strip/replace blocked.
    A caller may say so itself with meta['state']."""
    st = meta.get("state")
    if st in ("quarantined", "blocked"):
        return st
    action = meta.get("action")
    if action in (None, "", "quarantine"):
        return "quarantined"
    return "blocked"


class Store:
    """One quarantine directory.  Safe to use from many processes at once."""

    def __init__(self, directory, max_total_size=0, group=""):
        self.directory = os.path.abspath(directory)
        self.max_total_size = int(max_total_size or 0)
        self.group = group or ""
        self._gid = None

    @classmethod
    def from_config(cls, section):
        """Store from a validated [quarantine] config section."""
        return cls(section["directory"], section.get("max_total_size", 0),
                   section.get("group", ""))

    # -- paths (only ever from checked IDs) --------------------------------

    def path(self, qid, name=None):
        p = os.path.join(self.directory, check_id(qid))
        return p if name is None else os.path.join(p, name)

    def content_path(self, qid):
        return self.path(qid, CONTENT)

    # -- permissions ---------------------------------------------------------

    def gid(self):
        """The administrators' group id, or -1 (leave as is)."""
        if self._gid is None:
            self._gid = -1
            if self.group:
                if self.group.isdigit():
                    self._gid = int(self.group)
                else:
                    import grp
                    try:
                        self._gid = grp.getgrnam(self.group).gr_gid
                    except KeyError:
                        raise QuarantineError("quarantine group %r does not exist" % self.group)
        return self._gid

    def _owner(self):
        """uid for what root creates in the store: the directory's owner
        (the proxies' user), so that the proxies and the purge timer can
        still use the ledger and the index after root ran the CLI."""
        if os.geteuid() != 0:
            return -1
        try:
            return os.stat(self.directory).st_uid
        except OSError:
            return -1

    def _own(self, path, mode, fd=None):
        """Set mode, the directory owner (when root) and the administrators'
        group (when configured).  A process that may not chown (not root,
        not in the group) leaves the group as it is: a setgid quarantine
        directory has already given it, and otherwise the entry stays
        private to the proxy's user (safe, only less convenient; refusing
        mail for it would be worse)."""
        gid = self.gid()
        uid = self._owner()
        if gid >= 0 or uid >= 0:
            try:
                if fd is not None:
                    os.fchown(fd, uid, gid)
                else:
                    os.chown(path, uid, gid)
            except PermissionError:
                pass
        if fd is not None:
            os.fchmod(fd, mode)
        else:
            os.chmod(path, mode)

    def ensure_directory(self):
        """Create the quarantine directory (0750, setgid with a group)."""
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=DIR_MODE, exist_ok=True)
            mode = DIR_MODE | (0o2000 if self.group else 0)
            self._own(self.directory, mode)

    # -- locking and the size ledger -----------------------------------------

    def _lock(self):
        """flock on the quarantine directory itself: nothing to create, and
        every process that may read the store (proxies, root's CLI, the
        purge timer's user) can take it."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _unlock(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def locked(self):
        """Context manager: the store's exclusive lock (for CLI changes)."""
        store = self

        class _Locked:
            def __enter__(self):
                self.fd = store._lock()
                return store

            def __exit__(self, *exc):
                store._unlock(self.fd)
                return False
        return _Locked()

    def _read_usage(self):
        try:
            with open(os.path.join(self.directory, USAGE_NAME), "rb") as f:
                text = f.read(64).strip()
            if text.isdigit():
                return int(text)
        except OSError:
            pass
        return None

    def _write_usage(self, total):
        path = os.path.join(self.directory, USAGE_NAME)
        tmp = "%s.%d.%s" % (path, os.getpid(), os.urandom(4).hex())
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, b"%d\n" % max(0, total))
            try:
                self._own(tmp, FILE_MODE, fd)
            except OSError:
                pass
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def measure(self):
        """Total content bytes of all entries, from the files (slow path)."""
        total = 0
        for qid in self.ids():
            try:
                total += os.lstat(self.content_path(qid)).st_size
            except OSError:
                pass
        return total

    def usage(self, lock=True):
        """Content bytes in the store, from the ledger (measured when absent)."""
        fd = self._lock() if lock else None
        try:
            total = self._read_usage()
            if total is None:
                total = self.measure()
                try:
                    self._write_usage(total)
                except OSError:
                    pass
            return total
        finally:
            if fd is not None:
                self._unlock(fd)

    def recount(self):
        """Recompute the ledger from the files (purge and reindex call this)."""
        fd = self._lock()
        try:
            total = self.measure()
            self._write_usage(total)
            return total
        finally:
            self._unlock(fd)

    # -- add -------------------------------------------------------------------

    def add(self, source, meta):
        """Store the bytes of `source` (a binary file object, read from its
        start, or a path) with `meta`; returns the new ID.  Raises
        QuarantineError when the store is full or anything fails; then
        nothing of the entry is visible."""
        try:
            return self._add(source, dict(meta or {}))
        except QuarantineError:
            raise
        except (OSError, ValueError, TypeError) as e:
            raise QuarantineError("quarantine write failed: %s" % e) from e

    def _add(self, source, meta):
        self.ensure_directory()
        if self.max_total_size:
            # a store already full refuses before copying anything (the
            # authoritative check is under the lock below)
            hint = _size_hint(source)
            used = self._read_usage()
            if hint is not None and used is not None and used + hint > self.max_total_size:
                raise QuarantineError("quarantine full: %d + %d bytes > max_total_size %d"
                                      % (used, hint, self.max_total_size))
        tmp = None
        try:
            tmp = _mkdtemp(self.directory, TMP_PREFIX)
            size, digest = self._write_content(source, os.path.join(tmp, CONTENT))
            record = {k: _clean(v) for k, v in meta.items() if k not in COMPUTED}
            for k in LIST_KEYS:
                if k in record and not isinstance(record[k], list):
                    record[k] = [] if record[k] in (None, "") else [record[k]]
            qid = new_id()
            record.update(id=qid, created=utc_text(id_time(qid)), size=size,
                          sha256=digest, state=initial_state(meta), history=[])
            _write_file(os.path.join(tmp, META), _dump(record), self)
            self._own(tmp, DIR_MODE)
            _fsync_dir(tmp)
            # only the size check, the rename and the ledger need the lock
            fd = self._lock()
            try:
                if self.max_total_size:
                    used = self.usage(lock=False)
                    if used + size > self.max_total_size:
                        raise QuarantineError(
                            "quarantine full: %d + %d bytes > max_total_size %d"
                            % (used, size, self.max_total_size))
                else:
                    used = self._read_usage()
                _publish(tmp, self.path(qid))
                tmp = None
                if used is not None:
                    try:
                        self._write_usage(used + size)
                    except OSError:
                        pass
            finally:
                self._unlock(fd)
            _fsync_dir(self.directory)
            return qid
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _write_content(self, source, path):
        h = hashlib.sha256()
        size = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        with os.fdopen(fd, "wb") as out:
            self._own(path, FILE_MODE, out.fileno())
            if isinstance(source, (str, bytes, os.PathLike)):
                src, close = open(source, "rb"), True
            elif hasattr(source, "read") and hasattr(source, "seek"):
                src, close = source, False
                if _writable(src):
                    src.flush()
                src.seek(0)
            else:
                raise TypeError("quarantine source must be a binary file or a path, not %s"
                                % type(source).__name__)
            try:
                while True:
                    block = src.read(_CHUNK)
                    if not block:
                        break
                    if isinstance(block, str):
                        raise TypeError("quarantine content must be bytes")
                    h.update(block)
                    out.write(block)
                    size += len(block)
            finally:
                if close:
                    src.close()
            out.flush()
            os.fsync(out.fileno())
        return size, h.hexdigest()

    # -- reading -----------------------------------------------------------------

    def ids(self):
        """IDs of the complete entries, newest first (temp folders ignored)."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted((n for n in names if len(n) == ID_LEN and ID_RE.fullmatch(n)),
                      reverse=True)

    def exists(self, qid):
        """A real entry directory (a symlink planted in the store is not)."""
        import stat
        try:
            return stat.S_ISDIR(os.lstat(self.path(qid)).st_mode)
        except FileNotFoundError:
            return False

    def entry(self, qid):
        """The path of an existing entry directory.  NotFound when absent;
        QuarantineError when it is not a real directory: root's CLI never
        follows a symlink the proxies' user could have planted."""
        import stat
        path = self.path(qid)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound("no quarantine entry %s" % qid)
        except OSError as e:
            raise QuarantineError("cannot read entry %s: %s" % (qid, e.strerror or e))
        if not stat.S_ISDIR(st.st_mode):
            raise QuarantineError("entry %s is not a directory" % qid)
        return path

    def _open(self, qid, name):
        """A file of an entry, opened read-only without following symlinks."""
        path = os.path.join(self.entry(qid), name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise QuarantineError("entry %s has no %s" % (qid, name))
        except OSError as e:
            raise QuarantineError("cannot read %s: %s" % (path, e.strerror or e))
        import stat
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise QuarantineError("%s is not a regular file" % path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def get(self, qid):
        """The meta.json record of one entry; NotFound if absent."""
        with self._open(qid, META) as f:
            try:
                data = f.read()
            except OSError as e:
                raise QuarantineError("cannot read %s/%s: %s" % (qid, META, e.strerror or e))
        try:
            meta = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise QuarantineError("damaged %s/%s: %s" % (qid, META, e))
        if not isinstance(meta, dict):
            raise QuarantineError("damaged %s/%s: not an object" % (qid, META))
        return meta

    def open_content(self, qid):
        """The entry's bytes, a binary file opened for reading."""
        return self._open(qid, CONTENT)

    def recent_copy(self, sha256, seconds, match=None):
        """The ID of an entry created in the last `seconds` whose content
        has this sha256 (and whose meta has every key/value of `match`),
        or None.  Reads only the meta of entries that recent (IDs sort by
        time): a caller keeping blocked copies skips the same bytes
        blocked again and again, so a remote client repeating a refused
        transfer cannot fill the store."""
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            seconds=seconds)
        for qid in self.ids():
            if id_time(qid) < since:
                break
            try:
                meta = self.get(qid)
            except QuarantineError:
                continue
            if meta.get("sha256") == sha256 and all(meta.get(k) == v
                                                    for k, v in (match or {}).items()):
                return qid
        return None

    # -- changes (the CLI) ----------------------------------------------------------

    def update(self, qid, change):
        """Rewrite meta.json atomically under the lock: change(meta) edits
        the dict in place (or returns a new one).  Returns the new record."""
        check_id(qid)
        fd = self._lock()
        try:
            meta = self.get(qid)
            new = change(meta)
            if new is None:
                new = meta
            new["id"] = qid
            entry = self.entry(qid)
            tmp = os.path.join(entry, ".meta.%s.tmp" % os.urandom(4).hex())
            try:
                _write_file(tmp, _dump(new), self)
                os.replace(tmp, os.path.join(entry, META))
            except OSError as e:
                _unlink(tmp)
                raise QuarantineError("cannot update %s: %s" % (qid, e.strerror or e))
            _fsync_dir(entry)
            return new
        finally:
            self._unlock(fd)

    def delete(self, qid):
        """Remove one entry: renamed out of sight first, then removed."""
        check_id(qid)
        fd = self._lock()
        try:
            entry = self.path(qid)
            if not os.path.lexists(entry):
                raise NotFound("no quarantine entry %s" % qid)
            size = 0
            try:
                size = os.lstat(os.path.join(entry, CONTENT)).st_size
            except OSError:
                pass
            gone = os.path.join(self.directory, DEL_PREFIX + qid)
            try:
                os.rename(entry, gone)
            except FileNotFoundError:
                raise NotFound("no quarantine entry %s" % qid)
            except OSError as e:
                raise QuarantineError("cannot delete %s: %s" % (qid, e.strerror or e))
            used = self._read_usage()
            if used is not None:
                try:
                    self._write_usage(used - size)
                except OSError:
                    pass
        finally:
            self._unlock(fd)
        if os.path.islink(gone):
            _unlink(gone)                 # never follow what someone planted
        else:
            shutil.rmtree(gone, ignore_errors=True)
        return size

    def leftovers(self, older_than=3600, now=None):
        """Temp and half-deleted folders older than `older_than` seconds
        (what a crashed writer or deleter left)."""
        now = time.time() if now is None else now
        out = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.startswith((TMP_PREFIX, DEL_PREFIX)):
                        try:
                            if now - e.stat(follow_symlinks=False).st_mtime >= older_than:
                                out.append(e.path)
                        except OSError:
                            pass
        except FileNotFoundError:
            pass
        return out

    def remove_leftovers(self, older_than=3600, now=None):
        paths = self.leftovers(older_than, now)
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
        return paths


# -- helpers ---------------------------------------------------------------------

def _dump(record):
    return (json.dumps(record, ensure_ascii=True, sort_keys=True, indent=1) + "\n").encode("ascii")


def _size_hint(source):
    try:
        if isinstance(source, (str, bytes, os.PathLike)):
            return os.stat(source).st_size
        return os.fstat(source.fileno()).st_size
    except (OSError, AttributeError, ValueError):     # io.UnsupportedOperation is both
        return None


def _writable(f):
    try:
        return f.writable()
    except (AttributeError, ValueError):
        return False


def _write_file(path, data, store):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    try:
        store._own(path, FILE_MODE, fd)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdtemp(directory, prefix):
    for _ in range(100):
        path = os.path.join(directory, prefix + os.urandom(8).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise QuarantineError("cannot make a temp folder in %s" % directory)


def _publish(tmp, final):
    """Rename the finished temp folder into place.  rename(2) would replace
    an existing *empty* directory, so refuse if anything is there."""
    if os.path.lexists(final):
        raise OSError(errno.EEXIST, "entry exists", final)
    os.rename(tmp, final)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the list index (CLI only) ------------------------------------------------------

INDEX_NAME = ".index.sqlite"
INDEX_VERSION = "2"
# the columns a list row has besides its JSON text; filters and the table use
# them without decoding JSON (that decode is what costs with 100,000 rows)
COLUMNS = ("id", "created", "state", "protocol", "direction", "size", "sender",
           "recipients", "viruses", "target")


def summary(meta):
    """The list row of one meta.json record: the record without its
    history; the last successful release is summarised as released_at /
    released_to."""
    row = {k: v for k, v in meta.items() if k != "history"}
    for ev in reversed(meta.get("history") or []):
        if isinstance(ev, dict) and ev.get("event") == "release" and ev.get("released"):
            row["released_at"] = ev.get("when")
            row["released_to"] = ev.get("to")
            break
    return row


def _joined(values):
    if not isinstance(values, list):
        values = [] if values in (None, "") else [values]
    return "\n".join(str(v).replace("\n", " ") for v in values)


class Row(tuple):
    """One list row: the COLUMNS as attributes (recipients and viruses as
    lists), .json the row's JSON text, .data() the row decoded."""

    __slots__ = ()

    def __new__(cls, values, text=None):
        """Row(column values + (json text,)) or Row(column values, json text)."""
        return tuple.__new__(cls, values if text is None else tuple(values) + (text,))

    id = property(lambda self: self[0])
    created = property(lambda self: self[1])
    state = property(lambda self: self[2])
    protocol = property(lambda self: self[3])
    direction = property(lambda self: self[4])
    size = property(lambda self: self[5])
    sender = property(lambda self: self[6])
    recipients = property(lambda self: self[7].split("\n") if self[7] else [])
    viruses = property(lambda self: self[8].split("\n") if self[8] else [])
    target = property(lambda self: self[9])
    json = property(lambda self: self[10])

    def data(self):
        return json.loads(self[10])


def _values(row):
    """The column values of a summary dict."""
    if row.get("protocol") == "ftp":
        target = "%s@%s:%s" % (row.get("ftp_user") or "", row.get("ftp_server") or "",
                               row.get("ftp_path") or row.get("filename") or "")
    else:
        target = ""
    sender = row.get("sender")
    return (row["id"], row.get("created"), row.get("state"), row.get("protocol"),
            row.get("direction"), row.get("size"),
            None if sender is None and "sender" not in row else str(sender or ""),
            _joined(row.get("recipients")), _joined(row.get("viruses")), target)


def _globany(pattern, joined):
    """SQL function: does any line of `joined` match the glob (case-insensitive)?"""
    if joined is None:
        return 0
    import fnmatch
    pattern = pattern.lower()
    return int(any(fnmatch.fnmatchcase(v, pattern) for v in joined.lower().split("\n")))


class Filter:
    """What list asks for: exact state/protocol/direction, a created range
    (UTC ISO texts), case-insensitive globs on any virus, the sender, any
    recipient, and a limit (0: all)."""

    def __init__(self, state=None, protocol=None, direction=None, since=None, until=None,
                 virus=None, sender=None, recipient=None, limit=0):
        self.state, self.protocol, self.direction = state, protocol, direction
        self.since, self.until = since, until
        self.virus, self.sender, self.recipient = virus, sender, recipient
        self.limit = limit or 0

    def sql(self):
        clauses, args = [], []
        for col in ("state", "protocol", "direction"):
            v = getattr(self, col)
            if v:
                clauses.append("%s = ?" % col)
                args.append(v)
        if self.since:
            clauses.append("created >= ?")
            args.append(self.since)
        if self.until:
            clauses.append("created < ?")
            args.append(self.until)
        for col, v in (("viruses", self.virus), ("sender", self.sender),
                       ("recipients", self.recipient)):
            if v is not None:
                clauses.append("globany(?, %s)" % col)
                args.append(v)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def matches(self, values):
        qid, created, state, protocol, direction = values[:5]
        for col, v in (("state", state), ("protocol", protocol), ("direction", direction)):
            want = getattr(self, col)
            if want and v != want:
                return False
        created = created or ""
        if self.since and created < self.since:
            return False
        if self.until and created >= self.until:
            return False
        for want, v in ((self.virus, values[8]), (self.sender, values[6]),
                        (self.recipient, values[7])):
            if want is not None and not _globany(want, v):
                return False
        return True


class Index:
    """A SQLite cache of the list rows, `<directory>/.index.sqlite`.

    The files stay the source of truth: every select() first compares the
    index's IDs with the directory's (one listdir), reads meta.json only for
    entries the index lacks and drops rows whose entry is gone.  Changes the
    CLI makes (release, delete, purge) go to meta.json first and then here;
    when the index cannot be written after such a change it is removed, so
    the next list rebuilds it.  rebuild() re-reads every meta.json.  A user
    who may read the store but not write it (the administrators' group) gets
    the same answers from a read-only index plus what it reads itself; a
    damaged index is removed and rebuilt."""

    def __init__(self, store):
        self.store = store
        self.path = os.path.join(store.directory, INDEX_NAME)
        self.db = None
        self.writable = False

    def open(self, _retry=True):
        import sqlite3
        if self.db is not None:
            return self.db
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            self._schema(db)
        except sqlite3.DatabaseError as e:
            if db is not None:
                db.close()
            text = str(e).lower()
            if _retry and "readonly" not in text and "unable to open" not in text \
                    and "locked" not in text and self._remove():
                return self.open(_retry=False)       # damaged: it is only a cache
            db = self._open_readonly()
        else:
            self.writable = True
            try:
                self.store._own(self.path, FILE_MODE)
            except (OSError, QuarantineError):
                pass
        db.create_function("globany", 2, _globany, deterministic=True)
        self.db = db
        return db

    def _open_readonly(self):
        import sqlite3
        from urllib.parse import quote
        try:
            db = sqlite3.connect("file:%s?mode=ro" % quote(self.path), uri=True, timeout=30,
                                 isolation_level=None)
            got = db.execute("SELECT value FROM info WHERE key='version'").fetchone()
            if got and got[0] == INDEX_VERSION:
                return db
            db.close()
        except sqlite3.DatabaseError:
            pass
        db = sqlite3.connect(":memory:", isolation_level=None)
        self._schema(db)
        return db

    def _schema(self, db):
        db.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
        got = db.execute("SELECT value FROM info WHERE key='version'").fetchone()
        if got is None or got[0] != INDEX_VERSION:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DROP TABLE IF EXISTS entries")
            db.execute("CREATE TABLE entries (id TEXT PRIMARY KEY, created TEXT, state TEXT,"
                       " protocol TEXT, direction TEXT, size INTEGER, sender TEXT,"
                       " recipients TEXT, viruses TEXT, target TEXT, row TEXT)")
            db.execute("INSERT OR REPLACE INTO info VALUES ('version', ?)", (INDEX_VERSION,))
            db.execute("COMMIT")

    def _remove(self):
        ok = True
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def sync(self):
        """Make the index match the directory.  Returns what could not be
        written (a read-only index): (rows to add in memory, ids to hide),
        and the damaged entries (unreadable meta.json) as rows."""
        db = self.open()
        try:
            names = os.listdir(self.store.directory)
        except FileNotFoundError:
            names = []
        on_disk = {n for n in names if len(n) == ID_LEN and n[0] != "."}
        indexed = {r[0] for r in db.execute("SELECT id FROM entries")}
        missing = sorted(n for n in on_disk - indexed if ID_RE.fullmatch(n))
        stale = indexed - on_disk
        new_rows, damaged = [], []
        for qid in missing:
            try:
                meta = self.store.get(qid)
            except NotFound:
                continue
            except QuarantineError as e:
                row = {"id": qid, "state": "damaged", "created": utc_text(id_time(qid)),
                       "error": str(e)}
                damaged.append(Row(_values(row), json.dumps(row, sort_keys=True)))
                continue
            meta["id"] = qid
            new_rows.append(summary(meta))
        if self.writable and (new_rows or stale):
            try:
                self._write(new_rows, stale)
                new_rows, stale = [], set()
            except Exception:
                pass
        extra = [Row(_values(r), json.dumps(r, sort_keys=True)) for r in new_rows]
        return extra, stale, damaged

    def _write(self, rows, gone=()):
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           [_values(r) + (json.dumps(r, sort_keys=True),) for r in rows])
            db.executemany("DELETE FROM entries WHERE id=?", [(q,) for q in gone])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def put(self, meta):
        """After meta.json changed: update its row (or drop the index)."""
        self._change([summary(meta)], ())

    def forget(self, qids):
        self._change((), list(qids))

    def _change(self, rows, gone):
        if not os.path.exists(self.path):
            return
        try:
            self.open()
            if not self.writable:
                return
            self._write(rows, gone)
        except Exception:
            # the index may now disagree with the files: drop it, list rebuilds it
            self.close()
            self._remove()

    def rebuild(self):
        """Forget everything and re-read every meta.json; returns the number
        of rows indexed."""
        self.close()
        self._remove()
        self.open()
        if not self.writable:
            raise QuarantineError("cannot write the index %s" % self.path)
        self.sync()
        return self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def select(self, flt=None, with_json=True):
        """Row objects matching the Filter, newest first.  Without
        with_json their .json is None (the table needs only the columns,
        and fetching 100,000 JSON texts is most of a full --json list)."""
        flt = flt or Filter()
        extra, stale, damaged = self.sync()
        where, args = flt.sql()
        sql = "SELECT %s, %s FROM entries%s ORDER BY id DESC" % (
            ", ".join(COLUMNS), "row" if with_json else "NULL", where)
        more = [r for r in extra + damaged if flt.matches(r)]
        if flt.limit and not stale and not more:
            sql += " LIMIT %d" % int(flt.limit)
        rows = map(Row, self.db.execute(sql, args))
        if stale:
            rows = (r for r in rows if r.id not in stale)
        if more:
            rows = iter(sorted(list(rows) + more, key=lambda r: r.id, reverse=True))
        if flt.limit:
            import itertools
            rows = itertools.islice(rows, flt.limit)
        return rows

    def rows(self, **filters):
        """select() decoded into dicts (tests and small scripts)."""
        return [r.data() for r in self.select(Filter(**filters))]


def scan_rows(store):
    """The slow way (what the benchmark compares with): read every meta.json."""
    out = []
    for qid in store.ids():
        try:
            out.append(summary(store.get(qid)))
        except QuarantineError:
            pass
    return out
