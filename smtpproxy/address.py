"""RFC 5321 paths and ESMTP parameters, parsed strictly, and relay control.

parse_path('<@a,@b:user@example.com>') -> Path(local, domain, quoted,
routed).  A source route is accepted and dropped (RFC 5321 4.1.1.3,
appendix C); what goes upstream is always the bare mailbox.  Anything else
outside the grammar raises BadAddress: there is no "be liberal" fallback,
because a reader that guesses is a reader that two MTAs disagree with.

relay_allowed() is the proxy's own relay control (see DESIGN.md): a
`sendmail -bs` upstream takes everything as local submission.

What this module does not do: resolve domains or look up mailboxes.
"""

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
ATEXT_U = r"(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]|[^\x00-\x7f])"
LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
LDH_U = r"(?:[A-Za-z0-9]|[^\x00-\x7f])(?:(?:[A-Za-z0-9-]|[^\x00-\x7f])*(?:[A-Za-z0-9]|[^\x00-\x7f]))?"
QSTRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
QSTRING_U = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"'
ADDR_LIT = r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"


def _grammar(utf8):
    import re
    at, ldh, qs = (ATEXT_U, LDH_U, QSTRING_U) if utf8 else (ATEXT, LDH, QSTRING)
    domain = r"%s(?:\.%s)*\.?" % (ldh, ldh)     # a trailing dot is tolerated, then ignored
    dot_string = r"%s+(?:\.%s+)*" % (at, at)
    local = r"(?P<local>%s|%s)" % (dot_string, qs)
    route = r"(?P<route>@%s(?:,@%s)*:)?" % (domain, domain)
    mailbox = r"%s@(?P<domain>%s|%s)" % (local, domain, ADDR_LIT)
    return re.compile(r"^<%s(?:%s|(?P<postmaster>[Pp][Oo][Ss][Tt][Mm][Aa][Ss][Tt][Ee][Rr]))>$"
                      % (route, mailbox))


_PATH = {}                 # compiled on first use: every connection pays for imports
_KEYWORD = r"^[A-Za-z0-9][A-Za-z0-9-]*$"
_VALUE = r"^[\x21-\x3c\x3e-\x7e]+$"       # esmtp-value: no '=' nor SP nor controls
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
    if utf8 not in _PATH:
        _PATH[utf8] = _grammar(utf8)
    m = _PATH[utf8].match(text)
    if not m:
        raise BadAddress("bad path syntax")
    if m.group("postmaster"):
        if allow_null:
            raise BadAddress("Postmaster without a domain is for RCPT only")
        return Path("Postmaster", "", routed=bool(m.group("route")))
    local, domain = m.group("local"), m.group("domain")
    if len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        raise BadAddress("local part too long")
    if len(domain.encode("utf-8", "surrogateescape")) > MAX_DOMAIN:
        raise BadAddress("domain too long")
    return Path(local, domain.rstrip("."), quoted=local.startswith('"'),
                routed=bool(m.group("route")))


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


def parse_params(words):
    """['SIZE=10', 'SMTPUTF8'] -> [('SIZE', '10'), ('SMTPUTF8', None)]
    (keywords upper-cased).  Raises BadAddress."""
    import re
    out = []
    seen = set()
    for w in words:
        k, eq, v = w.partition("=")
        if not re.match(_KEYWORD, k) or (eq and not re.match(_VALUE, v)):
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
