"""RFC 5321 paths and ESMTP parameters, parsed strictly, and relay control.

parse_path('<@a,@b:user@example.com>') -> Path(local, domain, quoted,
routed).  A source route is accepted and dropped (RFC 5321 4.1.1.3,
appendix C); what goes upstream is always the bare mailbox.  Anything else
outside the grammar raises BadAddress: there is no "be liberal" fallback,
because a reader that guesses is a reader that two MTAs disagree with.
The grammar is checked by hand (character sets and splits, no regular
expressions): compiling the equivalent regex cost ~7 ms per connection.
tests/test_smtp_address.py compares it with that regex on hostile input.

relay_allowed() is the proxy's own relay control (see DESIGN.md): a
`sendmail -bs` upstream takes everything as local submission.

What this module does not do: resolve domains or look up mailboxes.
"""

_ATEXT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                   "!#$%&'*+/=?^_`{|}~-")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_LDH = _ALNUM | {"-"}
_DIGDOT = frozenset("0123456789.")
_HEXCOLDOT = frozenset("0123456789ABCDEFabcdef:.")


def _is_label(s, utf8):
    """Let-dig (ldh-str let-dig)? (RFC 5321 4.1.2); any non-ASCII
    character counts as a letter under SMTPUTF8 (RFC 6531 3.3)."""
    if not s:
        return False
    for i, c in enumerate(s):
        if c in _ALNUM or (utf8 and c > "\x7f"):
            continue
        if c == "-" and 0 < i < len(s) - 1:
            continue
        return False
    return True


def _is_domain(s, utf8):
    """Domain with one trailing dot tolerated (it is ignored later)."""
    if s.endswith("."):
        s = s[:-1]
    for label in s.split("."):
        if not _is_label(label, utf8):
            return False
    return True


def _is_address_literal(s):
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        return False
    s = s[1:-1]
    if s.startswith("IPv6:"):
        s = s[5:]
        return 2 <= len(s) <= 45 and all(c in _HEXCOLDOT for c in s)
    return 7 <= len(s) <= 15 and all(c in _DIGDOT for c in s)


def _is_dot_string(s, utf8):
    for atom in s.split("."):
        if not atom:
            return False
        for c in atom:
            if c not in _ATEXT and not (utf8 and c > "\x7f"):
                return False
    return True


def _quoted_end(s, utf8):
    """Index just past the quoted-string at the start of s, or -1.
    qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is '\\' and
    %d32-126 (RFC 5321 4.1.2)."""
    i, n = 1, len(s)
    while i < n:
        c = s[i]
        if c == '"':
            return i + 1
        if c == "\\":
            if i + 1 < n and " " <= s[i + 1] <= "~":
                i += 2
                continue
            return -1
        if not (" " <= c <= "~" or (utf8 and c > "\x7f")):
            return -1
        i += 1
    return -1


MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class BadAddress(ValueError):
    pass


class Path:
    __slots__ = ("local", "domain", "quoted", "routed")

    def __init__(self, local, domain, quoted=False, routed=False):
        self.local, self.domain, self.quoted, self.routed = local, domain, quoted, routed

    @property
    def mailbox(self):
        return "%s@%s" % (self.local, self.domain) if self.domain else self.local

    def __str__(self):
        return "<%s>" % self.mailbox

    def __repr__(self):
        return "Path(%r, %r)" % (self.local, self.domain)


def parse_path(text, utf8=False, allow_null=False):
    """A reverse- or forward-path ('<...>').  '<>' only when allow_null
    (MAIL FROM).  '<Postmaster>' without a domain is allowed (RCPT)."""
    if text == "<>":
        if allow_null:
            return Path("", "")
        raise BadAddress("null path not allowed here")
    if len(text) > MAX_PATH + 2:
        raise BadAddress("path too long")
    utf8 = bool(utf8)
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise BadAddress("bad path syntax")
    inner = text[1:-1]
    routed = False
    if inner.startswith("@"):
        # A-d-l ":" (RFC 5321 4.1.2): domains only, no address literals.
        colon = inner.find(":")
        if colon < 0:
            raise BadAddress("bad path syntax")
        for hop in inner[:colon].split(","):
            if not (hop.startswith("@") and _is_domain(hop[1:], utf8)):
                raise BadAddress("bad path syntax")
        inner, routed = inner[colon + 1:], True
    if len(inner) == 10 and inner.isascii() and inner.lower() == "postmaster":
        if allow_null:
            raise BadAddress("Postmaster without a domain is for RCPT only")
        return Path("Postmaster", "", routed=routed)
    if inner.startswith('"'):
        at = _quoted_end(inner, utf8)
    else:
        at = inner.find("@")
        if at >= 0 and not _is_dot_string(inner[:at], utf8):
            at = -1
    if at < 0 or inner[at:at + 1] != "@":
        raise BadAddress("bad path syntax")
    local, domain = inner[:at], inner[at + 1:]
    if not (_is_domain(domain, utf8) or _is_address_literal(domain)):
        raise BadAddress("bad path syntax")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise BadAddress("local part too long")
    if len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        raise BadAddress("domain too long")
    return Path(local, domain.rstrip("."), quoted=local.startswith('"'), routed=routed)


def split_command_arg(arg, keyword):
    """'FROM:<a@b> SIZE=10' with keyword 'FROM' -> ('<a@b>', ['SIZE=10']).
    One optional space after the colon is tolerated (many clients send it);
    the path itself is strict.  Raises BadAddress."""
    if arg[:len(keyword) + 1].upper() != keyword + ":":
        raise BadAddress("expected %s:" % keyword)
    rest = arg[len(keyword) + 1:]
    if rest.startswith(" "):
        rest = rest[1:]
    if not rest.startswith("<"):
        raise BadAddress("path must be in angle brackets")
    end = _path_end(rest)
    if end < 0:
        raise BadAddress("unterminated path")
    path, params = rest[:end + 1], rest[end + 1:]
    if params and not params.startswith(" "):
        raise BadAddress("junk after path")
    return path, params.split()


def _path_end(text):
    """Index of the '>' closing the path, honouring quoted strings."""
    inq = esc = False
    for i, c in enumerate(text):
        if esc:
            esc = False
        elif c == "\\" and inq:
            esc = True
        elif c == '"':
            inq = not inq
        elif c == ">" and not inq:
            return i
    return -1


def _is_keyword(k):
    """esmtp-keyword: (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")"""
    return bool(k) and k[0] in _ALNUM and all(c in _LDH for c in k)


def _is_value(v):
    """esmtp-value: 1*(%d33-60 / %d62-126), no '=' nor SP nor controls"""
    return bool(v) and all("!" <= c <= "~" and c != "=" for c in v)


def parse_params(words):
    """['SIZE=10', 'SMTPUTF8'] -> [('SIZE', '10'), ('SMTPUTF8', None)]
    (keywords upper-cased).  Raises BadAddress."""
    out = []
    seen = set()
    for w in words:
        k, eq, v = w.partition("=")
        if not _is_keyword(k) or (eq and not _is_value(v)):
            raise BadAddress("bad parameter %r" % w)
        k = k.upper()
        if k in seen:
            raise BadAddress("duplicate parameter %s" % k)
        seen.add(k)
        out.append((k, v if eq else None))
    return out


def domain_matches(domain, local_domains):
    """Is domain in local_domains?  Case-insensitive, trailing dot ignored;
    an entry '.example.com' matches subdomains of example.com."""
    d = domain.lower().rstrip(".")
    if not d or d.startswith("["):
        return False
    for e in local_domains:
        e = e.lower().rstrip(".")
        if e.startswith("."):
            if d.endswith(e):
                return True
        elif d == e:
            return True
    return False


def relay_allowed(path, inside, local_domains):
    """None when the recipient may be accepted, else the reason:
    'relay' (domain not local) or 'localpart' (%, ! or quoted @)."""
    if inside:
        return None
    if not path.domain:                 # <Postmaster>: always local (RFC 5321 4.5.1)
        return None
    local = path.local
    if "%" in local or "!" in local or (path.quoted and "@" in local):
        return "localpart"
    if not domain_matches(path.domain, local_domains):
        return "relay"
    return None
