"""FTP data-connection addresses: PORT/EPRT/PASV/EPSV arguments and replies.

Pure functions, no I/O.  Parsing is strict: every PORT field is a decimal
number 0..255 (a field > 255 is a syntax error, never wrapped), the port
is 1..65535, EPRT's delimiter is one printable ASCII character other than
a digit, and the address must be a literal of the protocol named (1 = IPv4,
2 = IPv6, RFC 2428).  Bounce protection (RFC 2577) is a separate check,
check_active(): the address must be the client's own control-connection
address (after normalising IPv4-mapped IPv6) and the port at least 1024.

The replies of the upstream server are parsed for their port only: the
proxy always connects to the server's control address (an address in a
227 reply is never trusted).
"""

import ipaddress
import re

from scanlib.net import normalise


class AddrError(ValueError):
    """A malformed argument: the reply code to give and its text."""

    def __init__(self, code, text):
        ValueError.__init__(self, text)
        self.code = code
        self.text = text


_NUM = re.compile(r"^[0-9]{1,3}$")


def parse_port(arg):
    """'h1,h2,h3,h4,p1,p2' -> (IPv4Address, port).  Raises AddrError(501)."""
    fields = arg.strip().split(",")
    if len(fields) != 6 or not all(_NUM.match(f.strip()) for f in fields):
        raise AddrError(501, "Syntax error in parameters")
    nums = [int(f) for f in fields]
    if any(n > 255 for n in nums):
        raise AddrError(501, "Syntax error in parameters (field out of range)")
    addr = ipaddress.IPv4Address(".".join(str(n) for n in nums[:4]))
    port = nums[4] * 256 + nums[5]
    if port == 0:
        raise AddrError(501, "Syntax error in parameters (port 0)")
    return addr, port


def parse_eprt(arg):
    """'|proto|addr|port|' (any delimiter char 33..126 not a digit) ->
    (ip_address, port).  Raises AddrError: 501 for syntax, 522 for a
    protocol number other than 1 or 2."""
    if len(arg) < 7:
        raise AddrError(501, "Syntax error in parameters")
    d = arg[0]
    if not (33 <= ord(d) <= 126) or d.isdigit():
        raise AddrError(501, "Syntax error in parameters (delimiter)")
    parts = arg.split(d)
    # '|1|a|p|' splits into ['', '1', 'a', 'p', '']
    if len(parts) != 5 or parts[0] or parts[4]:
        raise AddrError(501, "Syntax error in parameters")
    proto, host, port = parts[1], parts[2], parts[3]
    if proto not in ("1", "2"):
        raise AddrError(522, "Network protocol not supported, use (1,2)")
    try:
        addr = ipaddress.IPv4Address(host) if proto == "1" else ipaddress.IPv6Address(host)
    except ValueError:
        raise AddrError(501, "Syntax error in parameters (address)")
    if proto == "2" and "%" in host:
        raise AddrError(501, "Syntax error in parameters (address)")
    if not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise AddrError(501, "Syntax error in parameters (port)")
    return addr, int(port)


def check_active(verb, addr, port, client):
    """Bounce protection for PORT/EPRT: addr must be the client's own
    address (client: its control-connection address) and port >= 1024.
    Returns None when allowed, else (code, text)."""
    try:
        a, c = normalise(addr), normalise(client)
    except ValueError:
        return (500, "Illegal %s command" % verb)
    if a.version != c.version:
        # RFC 2428: 522 names the protocols the server will use.
        return (522, "Network protocol not supported, use (%d)" % (1 if c.version == 4 else 2))
    if a != c:
        return (500, "Illegal %s command (address is not the client's)" % verb)
    if port < 1024:
        return (500, "Illegal %s command (port < 1024)" % verb)
    return None


def format_pasv(addr, port):
    """'227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).' text (without code)."""
    a = normalise(addr)
    if a.version != 4:
        raise ValueError("PASV needs an IPv4 address")
    return "Entering Passive Mode (%s,%d,%d)." % (str(a).replace(".", ","), port >> 8, port & 255)


def format_epsv(port):
    return "Entering Extended Passive Mode (|||%d|)." % port


_PASV_REPLY = re.compile(r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV_REPLY = re.compile(r"\(([\x21-\x7e])\1\1(\d{1,5})\1\)")


def parse_pasv_reply(text):
    """The port of a server's 227 reply (its address is ignored).
    Raises AddrError(425)."""
    m = _PASV_REPLY.search(text)
    if not m:
        raise AddrError(425, "Upstream sent a malformed 227 reply")
    nums = [int(x) for x in m.groups()]
    if any(n > 255 for n in nums):
        raise AddrError(425, "Upstream sent a malformed 227 reply")
    port = nums[4] * 256 + nums[5]
    if not port:
        raise AddrError(425, "Upstream sent a malformed 227 reply")
    return port


def parse_epsv_reply(text):
    """The port of a server's 229 reply.  Raises AddrError(425)."""
    m = _EPSV_REPLY.search(text)
    if not m or not 0 < int(m.group(2)) < 65536:
        raise AddrError(425, "Upstream sent a malformed 229 reply")
    return int(m.group(2))


def parse_port_range(value):
    """(lo, hi) or 'lo-hi' -> (lo, hi)."""
    if isinstance(value, str):
        lo, hi = value.split("-")
        return int(lo), int(hi)
    return int(value[0]), int(value[1])
