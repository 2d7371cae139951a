"""Policy: pure decisions, no I/O.

(verdict, malformed?, direction's config view, scanner config) -> Decision.
The caller combines an item's verdicts with verdict.strongest() first; the
order of causes is infected > malformed > unscannable (size-limit,
encrypted) > unavailable > clean, and a permanent refusal beats a
temporary one.  The decision names what to do and, for refusals, the reply;
the proxies build the exact protocol text (with the scanner's finding).
"""

from collections import namedtuple

from scanlib.verdict import Clean, Infected, Unscannable, UNAVAILABLE, SIZE_LIMIT

# cause: clean | infected | malformed | unscannable | unavailable
# action (SMTP): deliver | pass | reject | discard | strip | replace | quarantine | hold | tempfail
# action (FTP):  pass | delete | quarantine | tempfail | reject
# code/status: the reply for refusals and holds (None for deliveries)
Decision = namedtuple("Decision", "cause action code status")

CAUSE_RANK = {"clean": 0, "unavailable": 1, "unscannable": 2, "malformed": 3, "infected": 4}


def cause_of(verdict, malformed=False):
    if isinstance(verdict, Infected):
        return "infected"
    if malformed:
        return "malformed"
    if isinstance(verdict, Unscannable):
        return "unavailable" if verdict.reason == UNAVAILABLE else "unscannable"
    return "clean"


def smtp(verdict, malformed, view, scanner):
    """Decision for one message.  view: the [smtp] view for the message's
    direction; scanner: the [scanner] section."""
    cause = cause_of(verdict, malformed)
    if cause == "clean":
        return Decision(cause, "deliver", None, None)
    if cause == "infected":
        action = view["action"]
        if action == "reject":
            return Decision(cause, "reject", 554, "5.7.1")
        if action == "discard":
            return Decision(cause, "discard", 250, "2.7.0")
        return Decision(cause, action, None, None)     # pass strip replace quarantine
    if cause == "malformed":
        return _refusal(cause, view["on_malformed"], 554, "5.6.0")
    if cause == "unscannable":
        if verdict.reason == SIZE_LIMIT:
            return _refusal(cause, scanner["on_unscannable"], 552, "5.3.4")
        return _refusal(cause, scanner["on_unscannable"], 554, "5.7.0")
    # unavailable
    how = scanner["on_unavailable"]
    if how == "tempfail":
        return Decision(cause, "tempfail", 451, "4.7.0")
    if how == "reject":
        return Decision(cause, "reject", 554, "5.7.0")
    return Decision(cause, "pass", None, None)


def _refusal(cause, how, code, status):
    if how == "reject":
        return Decision(cause, "reject", code, status)
    if how == "quarantine":
        return Decision(cause, "hold", 250, "2.7.0")
    return Decision(cause, "pass", None, None)


def ftp(verdict, view, scanner, upload):
    """Decision for one file transfer.  upload: STOR/APPE (codes 451/551/
    552) rather than RETR (451/550)."""
    cause = cause_of(verdict)
    if cause == "clean":
        return Decision(cause, "pass", None, None)
    if cause == "infected":
        action = view["action"]
        if action == "pass":
            return Decision(cause, "pass", None, None)
        return Decision(cause, action, 551 if upload else 550, None)
    if cause == "unscannable":
        how = scanner["on_unscannable"]
        if how == "pass":
            return Decision(cause, "pass", None, None)
        code = (552 if verdict.reason == SIZE_LIMIT else 551) if upload else 550
        return Decision(cause, "quarantine" if how == "quarantine" else "reject", code, None)
    how = scanner["on_unavailable"]
    if how == "tempfail":
        return Decision(cause, "tempfail", 451, None)
    if how == "reject":
        return Decision(cause, "reject", 550, None)
    return Decision(cause, "pass", None, None)
