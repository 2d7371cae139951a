"""`virusgw quarantine list|show|release|delete|purge|reindex`.

A thin layer over scanlib.quarantine (the store and its list index) and
scanlib.release (re-delivery).  Every ID from the command line is checked
against the store's strict pattern before anything else happens.  Errors are
one line on stderr, `virusgw: ...`; exit codes (scanlib.cli.ExitCode):
0 ok, 1 not found (or declined), 2 usage (bad ID, bad option, would
overwrite, already released), 69 upstream refused the release, 75 temporary
failure (store unreadable or busy, upstream unreachable), 78 configuration.

Who may do what follows from the files: the quarantine directory belongs to
the proxies' user and the [quarantine] group may read it, so members of that
group may `list` and `show`; `release`, `delete`, `purge` and `reindex`
change the store and need root (or the proxies' user).

This module is imported by scanlib.cli only; the proxies never import it.
"""

import datetime
import json
import os
import sys

import click

from scanlib import quarantine as q

# scanlib.cli imports this module while it is being imported itself, so its
# names are looked up at run time (see _codes()).


def _codes():
    from scanlib.cli import ExitCode
    return ExitCode


def fail(code, message):
    """One line on stderr and the exit code."""
    click.echo("virusgw: %s" % _printable(message, 500), err=True)
    sys.exit(int(code))


config_option = click.option(
    "-c", "--config", "config_path", metavar="FILE", default=None,
    help="Configuration file (default: $VIRUSGW_CONF, else /etc/virusgw.conf).")


class Ctx:
    def __init__(self, config_path):
        from scanlib.cli import load_config
        self.conf = load_config(config_path)
        self.store = q.Store.from_config(self.conf["quarantine"])
        if not os.path.isdir(self.store.directory):
            fail(_codes().TEMPFAIL, "quarantine directory %s does not exist (virusgw setup makes it)"
                 % self.store.directory)


def _store(config_path):
    return Ctx(config_path)


def _check(qid):
    try:
        return q.check_id(qid)
    except q.BadID as e:
        fail(_codes().USAGE, str(e))


def _errors(fn):
    """Map store errors to exit codes (NotFound 1, BadID 2, others 75)."""
    import functools

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        codes = _codes()
        try:
            return fn(*a, **kw)
        except q.BadID as e:
            fail(codes.USAGE, str(e))
        except q.NotFound as e:
            fail(codes.NOT_FOUND, str(e))
        except q.QuarantineError as e:
            fail(codes.TEMPFAIL, str(e))
        except BrokenPipeError:
            # The reader left (`list --json | head -1`): not an error of ours.
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            except OSError:
                pass
            sys.exit(codes.OK)
        except OSError as e:
            fail(codes.TEMPFAIL, "%s%s" % (e.strerror or e, ": %s" % e.filename if e.filename else ""))
        except Exception as e:
            if type(e).__module__ != "sqlite3":
                raise
            fail(codes.TEMPFAIL, "quarantine index: %s (virusgw quarantine reindex rebuilds it)" % e)
    return wrapped


# -- text for people ---------------------------------------------------------------------

def _printable(text, width=None):
    """Hostile text made safe for a terminal: controls and odd characters
    shown as \\xNN / \\uNNNN, bounded."""
    text = "" if text is None else str(text)
    out = []
    for ch in text:
        if ch.isprintable() and ch not in "\\":
            out.append(ch)
        elif ch == "\\":
            out.append("\\\\")
        else:
            o = ord(ch)
            out.append("\\x%02x" % o if o < 0x100 else "\\u%04x" % o if o < 0x10000 else "\\U%08x" % o)
    s = "".join(out)
    if width and len(s) > width:
        s = s[:max(1, width - 1)] + "~"
    return s


def _size(n):
    try:
        n = int(n)
    except (TypeError, ValueError):
        return "?"
    for unit in ("", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return ("%d%s" % (n, unit)) if unit == "" or n >= 10 else ("%.1f%s" % (n, unit))
        n /= 1024.0
    return str(n)


def _when(created):
    return (created or "")[:19].replace("T", " ")


def _who(row):
    """The table's last column: `<sender> -> rcpt +N` or `ftp user@server:path`."""
    if row.protocol == "ftp":
        return row.target
    rcpts = row.recipients
    more = " +%d" % (len(rcpts) - 1) if len(rcpts) > 1 else ""
    return "<%s> -> %s%s" % (row.sender or "", rcpts[0] if rcpts else "", more)


TABLE = (("ID", 35), ("CREATED (UTC)", 19), ("STATE", 11), ("PROTO", 12), ("SIZE", 6),
         ("VIRUS", 30), ("FROM/TO or FTP", 0))


def _table_line(values):
    cells = []
    for (name, width), v in zip(TABLE, values):
        v = _printable(v, width or 60)
        cells.append(v.ljust(width) if width else v)
    return "  ".join(cells).rstrip()


# -- parsing -------------------------------------------------------------------------------

def _time_bound(value, name):
    """--since/--until: a duration back from now (2d, 12h, 90m, 3600) or a
    UTC date or time (2026-12-01, 2026-12-01T10:00, 2026-12-01 10:00:00Z)."""
    if value is None:
        return None
    from scanlib.config import parse_duration
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        t = now - datetime.timedelta(seconds=parse_duration(value))
    except ValueError:
        text = value.strip().replace(" ", "T")
        if text.endswith(("Z", "z")):
            text = text[:-1]
        try:
            t = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise click.BadParameter("expected a duration (2d, 12h) or a UTC date/time "
                                     "(2026-12-01, 2026-12-01T10:00), not %r" % value,
                                     param_hint=name)
        if t.tzinfo is None:
            t = t.replace(tzinfo=datetime.timezone.utc)
        t = t.astimezone(datetime.timezone.utc)
    return q.utc_text(t)


def _size_arg(value, name):
    import re
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)[bB]?\s*", value or "")
    if not m:
        raise click.BadParameter("expected bytes, optionally with K, M, G or T: %r" % value,
                                 param_hint=name)
    return int(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower())


# -- the commands --------------------------------------------------------------------------

@click.group("quarantine")
def quarantine():
    """List, show, release, delete and purge quarantined items."""


@quarantine.command("list")
@config_option
@click.option("--since", metavar="WHEN", help="Only entries from this time on: 2d, 12h or a UTC date/time.")
@click.option("--until", metavar="WHEN", help="Only entries before this time.")
@click.option("--virus", metavar="GLOB", help="Only entries with a matching virus name (case-insensitive glob).")
@click.option("--protocol", type=click.Choice(["smtp", "ftp"]))
@click.option("--direction", type=click.Choice(["inbound", "outbound"]))
@click.option("--sender", metavar="GLOB", help="Envelope sender (case-insensitive glob).")
@click.option("--recipient", metavar="GLOB", help="Any recipient (case-insensitive glob).")
@click.option("--state", type=click.Choice(["quarantined", "blocked", "released", "damaged"]))
@click.option("--limit", type=click.IntRange(min=0), default=0, help="At most N entries (0: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@_errors
def list_cmd(config_path, since, until, virus, protocol, direction, sender, recipient, state,
             limit, as_json):
    """List entries, newest first."""
    since_t = _time_bound(since, "--since")
    until_t = _time_bound(until, "--until")
    ctx = _store(config_path)
    flt = q.Filter(state=state, protocol=protocol, direction=direction, since=since_t,
                   until=until_t, virus=virus, sender=sender, recipient=recipient, limit=limit)
    index = q.Index(ctx.store)
    out = sys.stdout
    try:
        rows = index.select(flt, with_json=as_json)
        if as_json:
            out.writelines(r.json + "\n" for r in rows)
            return
        out.write(_table_line([t for t, _ in TABLE]) + "\n")
        for r in rows:
            proto = "%s/%s" % (r.protocol or "?", (r.direction or "-")[:3])
            out.write(_table_line([r.id, _when(r.created), r.state, proto, _size(r.size),
                                   ",".join(r.viruses) or "-", _who(r)]) + "\n")
    finally:
        index.close()


@quarantine.command("show")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The record as JSON.")
@click.option("--content", is_flag=True,
              help="Write the raw bytes to stdout (refused when stdout is a terminal).")
@click.option("--output", "output", metavar="FILE", type=click.Path(dir_okay=False),
              help="Write the raw bytes to FILE.")
@click.option("--force", is_flag=True, help="Overwrite FILE.")
@_errors
def show(config_path, qid, as_json, content, output, force):
    """Show one entry's record (or its content)."""
    codes = _codes()
    _check(qid)
    ctx = _store(config_path)
    meta = ctx.store.get(qid)
    if output:
        from scanlib.release import write_file
        with ctx.store.open_content(qid) as src:
            try:
                write_file(src, output, force=force)
            except FileExistsError:
                fail(codes.USAGE, "%s exists (use --force to overwrite)" % output)
        click.echo("wrote %s (%d bytes) to %s" % (qid, meta.get("size", 0), output), err=True)
        return
    if content:
        if sys.stdout.isatty():
            fail(codes.USAGE, "not writing raw content to a terminal (pipe it, or use --output FILE)")
        sys.stdout.flush()
        out = sys.stdout.buffer
        with ctx.store.open_content(qid) as src:
            while True:
                block = src.read(1 << 16)
                if not block:
                    break
                out.write(block)
        out.flush()
        return
    if as_json:
        click.echo(json.dumps(meta, sort_keys=True, indent=1))
        return
    history = meta.get("history") or []
    for key in sorted(k for k in meta if k != "history"):
        v = meta[key]
        if isinstance(v, list):
            v = ", ".join(str(x) for x in v)
        click.echo("%-16s %s" % (key + ":", _printable(v, 400)))
    for ev in history:
        if not isinstance(ev, dict):
            continue
        click.echo("history:         %s %s by %s to %s: %s" % (
            _printable(ev.get("when")), _printable(ev.get("event")), _printable(ev.get("who")),
            _printable(ev.get("to")), "released" if ev.get("released") else
            _printable(ev.get("error") or "not released", 200)))
        for rcpt, answer in sorted((ev.get("recipients") or {}).items()):
            click.echo("                   %s: %s" % (_printable(rcpt, 100), _printable(answer, 200)))


def _who_runs():
    import pwd
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "uid %d" % uid
    sudo = os.environ.get("SUDO_USER")
    if sudo and uid == 0:
        name = "%s (sudo by %s)" % (name, _printable(sudo, 40))
    return name


def _entry_lock(store, qid):
    """An exclusive, non-blocking lock on one entry for the release."""
    import fcntl
    fd = os.open(store.entry(qid), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(_codes().TEMPFAIL, "%s is being released by another process" % qid)
    return fd


@quarantine.command("release")
@config_option
@click.argument("qid", metavar="ID")
@click.option("--to", "to", multiple=True, metavar="ADDR",
              help="Deliver to ADDR instead of the original recipients (repeatable).")
@click.option("--output", metavar="PATH", type=click.Path(dir_okay=False),
              help="For a file (FTP): write it to PATH.")
@click.option("--force", is_flag=True, help="Release again; overwrite PATH.")
@_errors
def release(config_path, qid, to, output, force):
    """Release one entry: re-deliver mail, or write a file to --output."""
    codes = _codes()
    _check(qid)
    ctx = _store(config_path)
    store = ctx.store
    lock = _entry_lock(store, qid)
    try:
        meta = store.get(qid)
        if meta.get("state") == "released" and not force:
            when = next((ev.get("when") for ev in reversed(meta.get("history") or [])
                         if isinstance(ev, dict) and ev.get("released")), "")
            fail(codes.USAGE, "%s was already released%s (use --force to release again)"
                 % (qid, " at %s" % when if when else ""))
        if meta.get("protocol") == "smtp":
            if output:
                fail(codes.USAGE, "%s is mail: it is released by re-delivery (to save its bytes: "
                     "virusgw quarantine show %s --output FILE)" % (qid, qid))
            _release_mail(ctx, qid, meta, list(to))
        else:
            if to:
                fail(codes.USAGE, "%s is a file (%s): release it with --output PATH"
                     % (qid, meta.get("protocol") or "?"))
            if not output:
                fail(codes.USAGE, "%s is a file: say where with --output PATH" % qid)
            _release_file(ctx, qid, meta, output, force)
    finally:
        os.close(lock)


def _record(ctx, qid, event):
    def change(meta):
        meta.setdefault("history", [])
        if not isinstance(meta["history"], list):
            meta["history"] = []
        meta["history"].append(event)
        if event.get("released"):
            meta["state"] = "released"
    new = ctx.store.update(qid, change)
    q.Index(ctx.store).put(new)
    return new


def _release_file(ctx, qid, meta, output, force):
    codes = _codes()
    from scanlib.release import write_file
    path = os.path.abspath(output)
    with ctx.store.open_content(qid) as src:
        try:
            n = write_file(src, path, force=force)
        except FileExistsError:
            fail(codes.USAGE, "%s exists (use --force to overwrite)" % output)
        except IsADirectoryError:
            fail(codes.USAGE, "%s is a directory" % output)
    _record(ctx, qid, {"event": "release", "who": _who_runs(), "when": q.utc_text(),
                       "to": "file:%s" % path, "released": True, "size": n})
    click.echo("released %s: wrote %d bytes to %s" % (qid, n, path))


def _release_mail(ctx, qid, meta, to):
    codes = _codes()
    from scanlib import release as rel
    for addr in to:
        try:
            rel.check_address(addr)
        except ValueError as e:
            fail(codes.USAGE, "--to: %s" % e)
    recipients = to or [str(r) for r in (meta.get("recipients") or [])]
    if not recipients:
        fail(codes.USAGE, "%s has no recipients: say whom with --to ADDR" % qid)
    sender = str(meta.get("sender") or "")
    upstream = ctx.conf["smtp"]["upstream"]
    client = str(meta.get("client") or "127.0.0.1")
    try:
        from scanlib.net import normalise
        client = str(normalise(client))
    except Exception:
        client = "127.0.0.1"
    event = {"event": "release", "who": _who_runs(), "when": q.utc_text(), "to": upstream,
             "sender": sender, "recipients": {}, "released": False}
    try:
        with ctx.store.open_content(qid) as src:
            payload = rel.mail_payload(meta, src, recipients,
                                       ctx.conf["quarantine"].get("release_from") or "")
            answers = rel.deliver(upstream, sender, recipients, payload, client=client)
    except rel.ReleaseError as e:
        event.update(recipients=e.answers.get("recipients") or {}, mail=e.answers.get("mail"),
                     data=e.answers.get("data"), error=str(e))
        _record(ctx, qid, event)
        for rcpt in recipients:
            click.echo("  %s: %s" % (_printable(rcpt, 200),
                                     _printable(event["recipients"].get(rcpt) or "not tried", 300)))
        fail(codes.TEMPFAIL if e.temporary else codes.UNAVAILABLE,
             "%s not released: %s" % (qid, e))
    event.update(recipients=answers["recipients"], mail=answers["mail"], data=answers["data"],
                 released=True)
    _record(ctx, qid, event)
    for rcpt in recipients:
        click.echo("  %s: %s" % (_printable(rcpt, 200), _printable(answers["recipients"].get(rcpt), 300)))
    click.echo("released %s through %s: %d of %d recipients accepted; %s"
               % (qid, upstream, len(answers["accepted"]), len(recipients),
                  _printable(answers["data"], 200)))


@quarantine.command("delete")
@config_option
@click.argument("qids", metavar="ID...", nargs=-1, required=True)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_errors
def delete(config_path, qids, yes):
    """Delete entries (asks first unless --yes)."""
    codes = _codes()
    for qid in qids:
        _check(qid)
    ctx = _store(config_path)
    if not yes:
        prompt = "Delete %s?" % (qids[0] if len(qids) == 1 else "%d entries" % len(qids))
        if not click.confirm(prompt, default=False, err=True):
            fail(codes.NOT_FOUND, "nothing deleted")
    missing = []
    done = []
    for qid in dict.fromkeys(qids):
        try:
            ctx.store.delete(qid)
            done.append(qid)
            click.echo("deleted %s" % qid)
        except q.NotFound:
            missing.append(qid)
    if done:
        q.Index(ctx.store).forget(done)
    if missing:
        fail(codes.NOT_FOUND, "no quarantine entry %s" % ", ".join(missing))


@quarantine.command("purge")
@config_option
@click.option("--older-than", metavar="AGE",
              help="Delete entries older than AGE (30d, 12h, ...; default: [quarantine] max_age).")
@click.option("--max-size", metavar="BYTES",
              help="Then delete the oldest until the content totals at most BYTES (K/M/G/T); "
                   "default: 90% of [quarantine] max_total_size (0: unlimited), 0: no size pass.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be deleted.")
@_errors
def purge(config_path, older_than, max_size, dry_run):
    """Keep the store under its age and size limits (the timer runs this)."""
    from scanlib.config import parse_duration
    ctx = _store(config_path)
    store = ctx.store
    if older_than is None:
        age = int(ctx.conf["quarantine"]["max_age"])
    else:
        try:
            age = parse_duration(older_than)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--older-than")
    if max_size is None:
        limit = int(ctx.conf["quarantine"].get("max_total_size") or 0) * 9 // 10
    else:
        limit = _size_arg(max_size, "--max-size")
    now = datetime.datetime.now(datetime.timezone.utc)
    cutoff = now - datetime.timedelta(seconds=age)
    ids = store.ids()                      # newest first
    victims = []
    keep = []
    for qid in ids:
        (victims if age > 0 and q.id_time(qid) < cutoff else keep).append(qid)
    if limit > 0:
        sizes = {}
        for qid in keep:
            try:
                sizes[qid] = os.lstat(store.content_path(qid)).st_size
            except OSError:
                sizes[qid] = 0
        total = sum(sizes.values())
        for qid in reversed(keep):          # oldest first
            if total <= limit:
                break
            victims.append(qid)
            total -= sizes[qid]
    freed = 0
    gone = []
    for qid in victims:
        if dry_run:
            click.echo("would delete %s" % qid)
            continue
        try:
            freed += store.delete(qid)
            gone.append(qid)
        except q.NotFound:
            pass
    if dry_run:
        click.echo("%d entries would be deleted" % len(victims))
        return
    leftovers = store.remove_leftovers(older_than=3600)
    if gone:
        q.Index(store).forget(gone)
    total = store.recount()
    click.echo("purged %d entries (%s), %d leftovers; %s in %d entries remain"
               % (len(gone), _size(freed), len(leftovers), _size(total), len(ids) - len(gone)))


@quarantine.command("reindex")
@config_option
@_errors
def reindex(config_path):
    """Rebuild the list index from the entries' meta.json files."""
    ctx = _store(config_path)
    index = q.Index(ctx.store)
    try:
        n = index.rebuild()
    finally:
        index.close()
    total = ctx.store.recount()
    click.echo("indexed %d entries (%s)" % (n, _size(total)))
