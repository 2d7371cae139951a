"""Addresses and direction.

Peer and local addresses are normalised first: an IPv4-mapped IPv6 address
(what a dual-stack [::] listener hands out for IPv4 clients) is its IPv4
address, so '::ffff:10.0.0.1' is inside 10.0.0.0/8.

SMTP: one decision per transaction by the client: inside -> outbound,
outside -> inbound.  FTP: by where the data goes: into an inside host from
an outside one is inbound, the reverse outbound, anything else None (the
base section applies).

ipaddress is imported only when an address is judged (it costs ~1-4 ms,
and the greeting must not wait for it); peer_of_stdin() does without it.
"""

INBOUND = "inbound"
OUTBOUND = "outbound"


def normalise(addr):
    """An ip_address for addr (str or address), IPv4-mapped -> IPv4, IPv6
    scope ids dropped.  Raises ValueError for what is not an address."""
    import ipaddress
    if not isinstance(addr, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        text = str(addr).strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.split("%", 1)[0]
        addr = ipaddress.ip_address(text)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class Networks:
    """A set of networks ('inside'); membership after normalising."""

    def __init__(self, specs):
        self.specs = list(specs)
        self._nets = None

    @property
    def nets(self):
        if self._nets is None:
            import ipaddress
            self._nets = [ipaddress.ip_network(s, strict=False) for s in self.specs]
        return self._nets

    def __contains__(self, addr):
        try:
            a = normalise(addr)
        except ValueError:
            return False
        return any(a.version == n.version and a in n for n in self.nets)


def smtp_direction(client, inside):
    """Direction of a mail transaction from client's address."""
    return OUTBOUND if client in inside else INBOUND


def ftp_direction(source, dest, inside):
    """Direction of a transfer whose data flows from source to dest."""
    s, d = source in inside, dest in inside
    if d and not s:
        return INBOUND
    if s and not d:
        return OUTBOUND
    return None


def is_public_target(addr, inside):
    """False for what an outside client must never reach: inside,
    loopback, link-local, unspecified, multicast or reserved addresses."""
    try:
        a = normalise(addr)
    except ValueError:
        return False
    if a in inside:
        return False
    return not (a.is_loopback or a.is_link_local or a.is_unspecified
                or a.is_multicast or a.is_reserved)


def canonical_text(addr):
    """Text of an address the kernel gave (getpeername/getsockname, already
    canonical): IPv4-mapped -> IPv4, scope id dropped; no ipaddress import."""
    addr = addr.split("%", 1)[0]
    low = addr.lower()
    if low.startswith("::ffff:"):
        rest = low[7:]
        if "." in rest and ":" not in rest:
            return rest                            # inet_ntop's form
        hi, _, lo = rest.partition(":")            # '::ffff:102:304' form
        if lo and ":" not in lo and len(hi) <= 4 and len(lo) <= 4:
            try:
                v = int(hi, 16) << 16 | int(lo, 16)
            except ValueError:
                return addr
            return "%d.%d.%d.%d" % (v >> 24, v >> 16 & 255, v >> 8 & 255, v & 255)
    return addr


def peer_of_stdin(environ=None):
    """The client's (address, port) for a process spawned with the socket on
    fd 0: getpeername, else $REMOTE_ADDR/$REMOTE_PORT (systemd), else
    $TCPREMOTEIP/$TCPREMOTEPORT (tcpserver).  Address normalised to text;
    ('', 0) when nothing is known (run by hand)."""
    import os
    import _socket      # the C module: the socket package (enum, selectors) costs ~3 ms
    env = os.environ if environ is None else environ
    try:
        fd = os.dup(0)
    except OSError:
        fd = -1
    s = None
    if fd >= 0:
        try:
            s = _socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
    if s is not None:
        try:
            peer = s.getpeername()
            if isinstance(peer, tuple) and peer:
                return canonical_text(peer[0]), int(peer[1])
        except (OSError, ValueError):
            pass
        finally:
            s.close()
    for a, p in (("REMOTE_ADDR", "REMOTE_PORT"), ("TCPREMOTEIP", "TCPREMOTEPORT")):
        if env.get(a):
            try:
                return str(normalise(env[a])), int(env.get(p) or 0)
            except ValueError:
                pass
    return "", 0
