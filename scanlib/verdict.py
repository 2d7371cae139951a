"""Scan verdicts.

A scan gives exactly one of Clean, Infected(names) or Unscannable(reason).
None of the failure forms is ever Clean: a scanner that could not answer
gives Unscannable('unavailable').  When one item has several results the
strongest wins (see STRENGTH and strongest()).
"""

UNAVAILABLE = "unavailable"     # unreachable, timeout, ERROR reply, broken pipe
SIZE_LIMIT = "size-limit"       # over [scanner] max_size or a clamd limit
ENCRYPTED = "encrypted"         # clamd says Heuristics.Encrypted.*
REASONS = (UNAVAILABLE, SIZE_LIMIT, ENCRYPTED)


class Verdict:
    __slots__ = ()
    kind = "?"
    clean = False

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__, self._key()))

    def _key(self):
        return ()

    def describe(self):
        """Text for logs (Unscannable adds its detail); str() is for clients."""
        return str(self)


class Clean(Verdict):
    __slots__ = ()
    kind = "clean"
    clean = True

    def __repr__(self):
        return "Clean()"

    def __str__(self):
        return "clean"


class Infected(Verdict):
    __slots__ = ("names",)
    kind = "infected"

    def __init__(self, names):
        if isinstance(names, str):
            names = (names,)
        names = tuple(dict.fromkeys(n for n in names if n))
        if not names:
            raise ValueError("Infected needs at least one name")
        self.names = names

    def _key(self):
        return self.names

    def __repr__(self):
        return "Infected(%r)" % (self.names,)

    def __str__(self):
        return "infected (%s)" % ", ".join(self.names)


class Unscannable(Verdict):
    __slots__ = ("reason", "detail")
    kind = "unscannable"

    def __init__(self, reason, detail=""):
        if reason not in REASONS:
            raise ValueError("unknown reason %r" % (reason,))
        self.reason = reason
        self.detail = detail

    def _key(self):
        return (self.reason,)

    def __repr__(self):
        return "Unscannable(%r, %r)" % (self.reason, self.detail)

    def __str__(self):
        # An outage's detail names internal sockets and addresses: it goes to
        # the log (the scanner logs it), never into text a client sees.
        if self.detail and self.reason != UNAVAILABLE:
            return "unscannable (%s: %s)" % (self.reason, self.detail)
        if self.reason == UNAVAILABLE:
            return "scanner unavailable"
        return "unscannable (%s)" % self.reason

    def describe(self):
        """The whole story, detail included: for logs, never for clients."""
        if self.detail:
            return "unscannable (%s: %s)" % (self.reason, self.detail)
        return "unscannable (%s)" % self.reason


def strength(v):
    """Rank a verdict: infected > unscannable (size-limit, encrypted) >
    unavailable > clean.  (Malformed structure ranks between infected and
    unscannable; it is not a verdict but policy knows it.)"""
    if isinstance(v, Infected):
        return 4
    if isinstance(v, Unscannable):
        return 1 if v.reason == UNAVAILABLE else 2
    return 0


def strongest(verdicts):
    """The strongest of several verdicts; Infected ones are merged so that
    every name found is kept.  An empty list is Clean."""
    verdicts = list(verdicts)
    names = [n for v in verdicts if isinstance(v, Infected) for n in v.names]
    if names:
        return Infected(names)
    best = Clean()
    for v in verdicts:
        if strength(v) > strength(best):
            best = v
    return best
