"""Configuration: /etc/virusgw.conf read with configobj, checked against the
spec shipped beside this module (scanlib/virusgw.spec).

The spec is the only place types, ranges and defaults live.  Every problem
is reported as one line naming the file, the line, the section and the key;
unknown keys and sections are errors.  The [[inbound]]/[[outbound]]
sections under [smtp] and [ftp] hold only what the administrator wrote
(their spec entries are generated here with default None) and are merged
over the base section by Config.view().

What this module does not do: open sockets, touch the spool, or import
click.  Loading is cheap on purpose: every connection pays for it.  A
validated copy is cached (marshal, keyed by the file's path, inode, size,
mtime and ctime, the spec's and the package's version) in
$VIRUSGW_CACHE_DIR or /var/cache/virusgw when that exists and is writable,
so most starts skip configobj (~17 ms) entirely.
"""

import os

from scanlib import __version__

DEFAULT_PATH = "/etc/virusgw.conf"
SPEC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "virusgw.spec")
OVERRIDABLE = ("smtp", "ftp")
DIRECTIONS = ("inbound", "outbound")
DEFAULT_CACHE_DIR = "/var/cache/virusgw"


class ConfigError(Exception):
    """The configuration could not be used.  .problems lists every problem,
    one line each, naming file, line, section and key."""

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        Exception.__init__(self, "\n".join(self.problems))


def find_path(path=None, environ=None):
    """-c FILE, else $VIRUSGW_CONF, else /etc/virusgw.conf."""
    if path:
        return path
    env = os.environ if environ is None else environ
    return env.get("VIRUSGW_CONF") or DEFAULT_PATH


def proxy_args(argv, prog):
    """The proxies' command line: [-c FILE] [-d] -> (config path or None,
    debug).  Anything else raises ValueError with the usage line: an inetd
    line with a typo must not run on some other configuration."""
    path, debug = None, False
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "-c" and i + 1 < len(argv):
            path = argv[i + 1]
            i += 2
            continue
        if a.startswith("-c") and len(a) > 2:
            path = a[2:]
        elif a == "-d":
            debug = True
        else:
            raise ValueError("usage: %s [-c FILE] [-d]" % prog)
        i += 1
    return path, debug


# -- value checks used by the spec ------------------------------------------

def parse_endpoint(text):
    """'unix:/path' -> ('unix', '/path'); 'tcp:HOST:PORT' or
    'tcp:[V6]:PORT' -> ('tcp', host, port).  Raises ValueError."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError("unix socket path must be absolute: %r" % text)
        return ("unix", path)
    if text.startswith("tcp:"):
        host, port = split_hostport(text[4:], None)
        if port is None:
            raise ValueError("tcp endpoint needs a port: %r" % text)
        return ("tcp", host, port)
    raise ValueError("endpoint must be unix:PATH, tcp:HOST:PORT or tcp:[V6]:PORT, not %r" % text)


def split_hostport(text, default_port):
    """'host', 'host:port', '[v6]', '[v6]:port', 'a.b.c.d:port' -> (host, port).
    A bare IPv6 address without brackets is taken whole.  Raises ValueError."""
    import re
    text = text.strip()
    port = default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in %r" % text)
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError("junk after ']' in %r" % text)
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    elif ":" in text:
        # Unbracketed and several colons: only a whole IPv6 address
        # ('a:b:c' is neither host:port nor an address).
        import ipaddress
        try:
            ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            raise ValueError("bad host in %r (write an IPv6 address with a port as [V6]:PORT)"
                             % text)
        host = text
    else:
        host = text
    if not host or not re.match(r"^[A-Za-z0-9._:%-]+$", host):
        raise ValueError("bad host in %r" % text)
    return host, port


def _port(p, text):
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ValueError("bad port in %r" % text)
    return int(p)


def _check_endpoints(value, *args, **kw):
    value = _as_list(value)
    if not value:
        raise _bad("at least one clamd endpoint is needed")
    for v in value:
        try:
            parse_endpoint(v)
        except ValueError as e:
            raise _bad(str(e))
    return value


def _check_networks(value, *args, **kw):
    import ipaddress
    value = _as_list(value)
    for v in value:
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise _bad("not a network: %r" % v)
    return value


def _check_domains(value, *args, **kw):
    import re
    out = []
    for v in _as_list(value):
        d = v.strip().lower().rstrip(".")
        if not re.match(r"^\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*$", d):
            raise _bad("not a domain: %r" % v)
        out.append(d)
    return out


def _check_upstream_smtp(value, *args, **kw):
    if not isinstance(value, str):
        raise _bad("expected one value, not a list (quote it)")
    if value.startswith("sendmail:"):
        import shlex
        try:
            argv = shlex.split(value[9:])
        except ValueError as e:
            raise _bad("bad sendmail command line: %s" % e)
        if not argv or not argv[0].startswith("/"):
            raise _bad("sendmail: needs an absolute program path")
        return value
    if value.startswith("smtp:"):
        try:
            host, port = split_hostport(value[5:], 25)
        except ValueError as e:
            raise _bad(str(e))
        return value
    raise _bad("must be sendmail:ARGV or smtp:HOST:PORT, not %r" % value)


def _check_upstream_ftp(value, *args, **kw):
    if not isinstance(value, str):
        raise _bad("expected one value, not a list (quote it)")
    if value == "userhost":
        return value
    if value.startswith("tcp:"):
        try:
            split_hostport(value[4:], 21)
        except ValueError as e:
            raise _bad(str(e))
        return value
    if value.startswith("command:"):
        import shlex
        try:
            argv = shlex.split(value[8:])
        except ValueError as e:
            raise _bad("bad command line: %s" % e)
        if not argv or not argv[0].startswith("/"):
            raise _bad("command: needs an absolute program path")
        return value
    raise _bad("must be userhost, tcp:HOST:PORT or command:ARGV, not %r" % value)


def _check_port_range(value, *args, **kw):
    import re
    if not isinstance(value, str):
        raise _bad("expected LOW-HIGH")
    m = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", value)
    if not m:
        raise _bad("expected LOW-HIGH, not %r" % value)
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 1024 <= lo <= hi <= 65535:
        raise _bad("port range must lie within 1024-65535, low <= high")
    return (lo, hi)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value):
    """'30d', '12h', '15m', '90s', '2w' or plain seconds -> seconds (int)."""
    import re
    m = re.match(r"^\s*(\d+)\s*([smhdw]?)\s*$", str(value))
    if not m:
        raise ValueError("expected a duration like 30d, 12h, 15m or seconds, not %r" % value)
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def _check_duration(value, *args, **kw):
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _bad(str(e))


def _bad(message):
    """A validation failure whose text is exactly our message (validate's
    own VdtValueError would wrap it in 'the value ... is unacceptable')."""
    from validate import ValidateError
    return ValidateError(message)


def _check_words(value, *args, **kw):
    """force_list without its trap: `key =` (an empty value) is an empty
    list, not [''], and empty items of 'a, , b' are dropped."""
    return [v.strip() for v in _as_list(value) if v and v.strip()]


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
    return list(value)


def _nullable(check):
    def wrapped(value, *args, **kw):
        if value is None:
            return None
        return check(value, *args, **kw)
    return wrapped


CHECKS = {
    "endpoints": _check_endpoints,
    "networks": _check_networks,
    "domains": _check_domains,
    "upstream_smtp": _check_upstream_smtp,
    "upstream_ftp": _check_upstream_ftp,
    "port_range": _check_port_range,
    "duration": _check_duration,
}


# -- loading -----------------------------------------------------------------

def _spec():
    """The spec as a ConfigObj, with [[inbound]]/[[outbound]] generated from
    [smtp]/[ftp]: same checks, default None (so they hold only what was
    written)."""
    from configobj import ConfigObj
    spec = ConfigObj(SPEC_PATH, _inspec=True, list_values=False, interpolation=False,
                     file_error=True)
    for proto in OVERRIDABLE:
        for d in DIRECTIONS:
            spec[proto][d] = {}
            for key, check in list(spec[proto].items()):
                if isinstance(check, str):
                    spec[proto][d][key] = _default_none(check)
    return spec


def _default_none(check):
    import re
    check = re.sub(r",?\s*default=(list\([^)]*\)|'[^']*'|[^,)]*)", "", check)
    if check.endswith("()"):
        return check[:-1] + "default=None)"
    return check[:-1] + ", default=None)"


def _validator():
    from validate import Validator
    checks = dict(CHECKS)
    checks["force_list"] = _check_words
    v = Validator(checks)
    # Overrides default to None: every check must let None through.
    for name, fn in list(v.functions.items()):
        v.functions[name] = _nullable(_plain_words(name, fn))
    return v


_TYPE_WORDS = {"integer": "a whole number", "float": "a number", "boolean": "yes or no",
               "string": "text", "option": "one of the listed words"}


def _plain_words(name, check):
    """validate's own messages ('the value "x" is unacceptable.') say
    neither what is allowed nor the limit: say both."""
    def wrapped(value, *args, **kw):
        import validate
        try:
            return check(value, *args, **kw)
        except validate.VdtValueTooSmallError:
            low = kw.get("min", args[0] if args else None)
            raise _bad("%s is too small: the minimum is %s" % (_show(value), low))
        except validate.VdtValueTooBigError:
            high = kw.get("max", args[1] if len(args) > 1 else None)
            raise _bad("%s is too big: the maximum is %s" % (_show(value), high))
        except validate.VdtValueTooShortError:
            raise _bad("must not be empty")
        except validate.VdtTypeError:
            if isinstance(value, (list, tuple)):
                raise _bad("expected one value, not a list (quote it)")
            raise _bad("%s is not %s" % (_show(value), _TYPE_WORDS.get(name, name)))
        except validate.VdtValueError as e:
            if name == "option":
                if isinstance(value, (list, tuple)):
                    raise _bad("expected one value, not a list")
                raise _bad("%s is not one of: %s" % (_show(value), ", ".join(args)))
            raise _bad(str(e))
    return wrapped


def _show(value):
    return '"%s"' % (value,) if not isinstance(value, (list, tuple)) else repr(list(value))


class _LineFinder:
    """configobj keeps no line numbers for values that fail validation:
    find them by reading the file (section headers and 'key =' lines)."""

    def __init__(self, path):
        import re
        self.keys = {}
        self.sections = {}
        try:
            with open(path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return
        stack = []
        for n, line in enumerate(lines, 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            m = re.match(r"^(\[+)\s*([^\]]*?)\s*(\]+)", s)
            if m:
                depth = len(m.group(1))
                stack = stack[:depth - 1] + [m.group(2)]
                self.sections.setdefault(tuple(stack), n)
                continue
            m = re.match(r"^([^=]+?)\s*=", s)
            if m:
                self.keys.setdefault((tuple(stack), m.group(1).strip()), n)

    def line(self, sections, key=None):
        sections = tuple(sections)
        if key is not None and (sections, key) in self.keys:
            return self.keys[(sections, key)]
        return self.sections.get(sections)


def _where(path, finder, sections, key=None):
    line = finder.line(sections, key)
    sect = "[" + "][".join(sections) + "]" if sections else "top level"
    loc = "%s:%s" % (path, line) if line else path
    if key is None:
        return "%s: section %s" % (loc, sect)
    return "%s: section %s, key '%s'" % (loc, sect, key)


def _parse_and_validate(path):
    from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
    problems = []
    if not os.path.exists(path):
        raise ConfigError(["%s: no such file" % path])
    if not os.path.isfile(path):
        raise ConfigError(["%s: not a regular file" % path])
    try:
        conf = ConfigObj(path, configspec=_spec(), file_error=True, interpolation=False,
                         encoding="utf-8", raise_errors=False)
    except ConfigObjError as e:
        for err in getattr(e, "errors", []) or [e]:
            line = getattr(err, "line_number", None)
            msg = getattr(err, "msg", None) or str(err)
            problems.append("%s:%s: %s" % (path, line, msg) if line else "%s: %s" % (path, msg))
        raise ConfigError(problems)
    except UnicodeDecodeError:
        raise ConfigError(["%s:%s: not UTF-8 text" % (path, _first_bad_line(path))])
    except OSError as e:
        raise ConfigError(["%s: cannot read: %s" % (path, e.strerror or e)])
    finder = _LineFinder(path)
    result = conf.validate(_validator(), preserve_errors=True)
    if result is not True:
        for sections, key, err in flatten_errors(conf, result):
            if key is None:
                problems.append("%s: missing section" % _where(path, finder, sections))
            elif err is False:
                problems.append("%s: missing value" % _where(path, finder, sections, key))
            else:
                problems.append("%s: %s" % (_where(path, finder, sections, key), _errtext(err)))
    for sections, name in get_extra_values(conf):
        sub = conf
        for s in sections:
            sub = sub[s]
        if isinstance(sub.get(name), dict):
            problems.append("%s: unknown section" % _where(path, finder, tuple(sections) + (name,)))
        else:
            problems.append("%s: unknown key" % _where(path, finder, sections, name))
    problems.extend(_cross_checks(conf, path, finder))
    if problems:
        raise ConfigError(sorted(problems, key=lambda p: _line_of(p, path)))
    return _plain(conf)


def _line_of(problem, path):
    """Sort key: the line number after 'path:' (problems without one last)."""
    rest = problem[len(path) + 1:]
    num = rest.split(":", 1)[0]
    return int(num) if num.isdigit() else 1 << 30


def _first_bad_line(path):
    """Number of the first line that is not UTF-8 ('?' if none is found)."""
    try:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except OSError:
        pass
    return "?"


def _errtext(err):
    text = str(err)
    return text if text else err.__class__.__name__


def _plain(section):
    return {k: (_plain(v) if isinstance(v, dict) else v) for k, v in section.items()}


def _cross_checks(conf, path, finder):
    problems = []
    max_size = conf["scanner"]["max_size"]
    if not isinstance(max_size, int):
        return problems
    for d in (None,) + DIRECTIONS:
        sect = conf["smtp"] if d is None else conf["smtp"][d]
        mms = sect.get("max_message_size")
        if isinstance(mms, int) and mms > max_size:
            where = ("smtp",) if d is None else ("smtp", d)
            problems.append("%s: %d exceeds [scanner] max_size (%d): bigger messages could "
                            "not be scanned" % (_where(path, finder, where, "max_message_size"),
                                                mms, max_size))
    return problems


class Config(dict):
    """The validated configuration: nested plain dicts, plus .path and
    view(section, direction)."""

    path = None

    def view(self, section, direction=None):
        """[smtp] or [ftp] with the [[inbound]]/[[outbound]] overrides for
        direction merged over it (direction None: the base section)."""
        base = self[section]
        merged = {k: v for k, v in base.items() if k not in DIRECTIONS}
        if direction in DIRECTIONS:
            for k, v in base.get(direction, {}).items():
                if v is not None:
                    merged[k] = v
        return merged


def load(path=None, cache=True):
    """Find, read and validate the configuration; raises ConfigError."""
    path = os.path.abspath(find_path(path))
    try:
        st = os.stat(path)
        sst = os.stat(SPEC_PATH)
    except OSError as e:
        raise ConfigError(["%s: cannot read: %s" % (path, e.strerror)])
    key = (path, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino,
           sst.st_mtime_ns, sst.st_size, __version__)
    cpath = _cache_path(path) if cache else None
    data = _cache_get(cpath, key) if cpath else None
    if data is None:
        data = _parse_and_validate(path)
        if cpath:
            _cache_put(cpath, key, data)
    conf = Config(data)
    conf.path = path
    return conf


def _cache_path(conf_path):
    """Where the validated copy of conf_path is kept: $VIRUSGW_CACHE_DIR,
    else /var/cache/virusgw (made by `virusgw setup`); empty disables.
    The name is derived from the path, never from anything the network
    says."""
    d = os.environ.get("VIRUSGW_CACHE_DIR", DEFAULT_CACHE_DIR)
    if not d:
        return None
    name = conf_path.replace("%", "%25").replace("/", "%2F")
    return os.path.join(d, "conf-%d-%s" % (os.geteuid(), name[-180:]))


def _cache_get(cpath, key):
    """The validated copy from an earlier start, if it is current and was
    written by us (or root) and nobody else can write it."""
    import marshal
    try:
        fd = os.open(cpath, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return None
        with os.fdopen(fd, "rb") as f:
            fd = None
            stored_key, data = marshal.loads(f.read(1 << 20))
    except Exception:
        return None
    finally:
        if fd is not None:
            os.close(fd)
    return data if stored_key == key else None


def _cache_put(cpath, key, data):
    """Write the cache atomically (temp file + rename); failure is silent:
    the cache only saves time."""
    import marshal
    tmp = "%s.%d.tmp" % (cpath, os.getpid())
    try:
        blob = marshal.dumps((key, data))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, cpath)
    except Exception:
        try:
            os.unlink(tmp)
        except OSError:
            pass
