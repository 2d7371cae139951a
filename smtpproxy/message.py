"""One message after its final dot: split, scan, decide, act, deliver.

Message(proxy, body_file, reader).process() -> (reply bytes, outcome) with
outcome delivered | blocked | lost (the upstream died: the connection ends).

Scan units: the whole message plus every portion the splitter wrote, all
handed to Scanner.scan_many (parallel connections) in a worker thread
while the main thread keeps a TCP upstream alive; everything after the
final dot, the upstream's DATA included, runs against [smtp] deadline.

Decisions come from scanlib.policy.  Our own choices, documented in
virusgw-smtpproxy(8):
  - strip/replace/quarantine act on the infected portions only when the
    structure is trusted (not malformed) and every virus the whole-message
    scan found is accounted for by a portion; otherwise on the whole body;
  - after the infected portions are taken out, what remains is judged
    again (an unscannable or unavailable remainder gets its own policy), so
    stripping never launders an unscanned part;
  - reject/discard keep a copy in quarantine when [quarantine] keep_blocked;
    a quarantine that cannot be written is a temporary refusal, never a
    delivery.
"""

import os
import time

from smtpproxy import replies as R

BLOCK_REASON = {"infected": "infected", "malformed": "malformed",
                "unscannable": "unscannable", "unavailable": "unscannable"}


class Message:
    def __init__(self, proxy, body, reader):
        self.p = proxy
        self.body = body
        self.reader = reader
        self.sess = proxy.session
        self.view = proxy.view
        self.conf = proxy.conf
        self.log = proxy.log
        self.started = time.monotonic()
        self.deadline = self.started + self.view["deadline"]
        self.structure = None
        self.verdict = None
        self.qids = []
        self.scanner = None
        self.t_split = self.t_scan = None

    # -- helpers -----------------------------------------------------------------
    def finding(self):
        v = self.verdict
        return str(v) if v is not None else "not scanned"

    def details(self, limit=8):
        """One line per scan unit that was not clean, for the reply's
        continuation lines: what the scanner said about each."""
        out = []
        whole = getattr(self, "whole", None)
        if whole is not None and not whole.clean:
            out.append("message: %s" % whole)
        for p, v in getattr(self, "parts", ()):
            if not v.clean:
                name = ' "%s"' % p.filename if p.filename else ""
                out.append("part %s%s: %s" % (p.index, name, v))
        if len(out) > limit:
            out = out[:limit] + ["and %d more" % (len(out) - limit)]
        return out

    def reply(self, code, status, text, extra=()):
        lines = ["%s %s" % (status, t) if status else t for t in list(extra) + [text]]
        return R.reply(code, lines)

    def rset_upstream(self):
        from smtpproxy.upstream import UpstreamError
        up = self.p.upstream
        if up is not None and up.alive:
            try:
                up.command(b"RSET\r\n")
            except UpstreamError as e:
                self.log.warning("upstream RSET failed: %s", e)

    def done(self, reply, outcome, action, upstream_reply=""):
        from scanlib import log as L
        s = self.sess
        self.log.info(L.summary(
            id="%d.%d" % (os.getpid(), self.p.messages), client=self.p.peer_text,
            direction=self.p.direction,
            **{"from": s.sender.mailbox if s.sender is not None else "-"},
            to=[r.mailbox for r in s.recipients], size=self.reader.size,
            verdict=self.verdict.describe() if self.verdict is not None else "not scanned",
            malformed=",".join(self.structure.malformed)
            if self.structure is not None and self.structure.malformed else "",
            action=action, qid=self.qids, upstream=upstream_reply,
            reply=reply.split(b"\r\n")[-2].decode("ascii", "replace") if reply else "",
            secs="%.3f" % (time.monotonic() - self.started),
            split_secs="%.3f" % (self.t_split - self.started) if self.t_split else "",
            scan_secs="%.3f" % (self.t_scan - self.t_split) if self.t_scan else ""))
        return reply, outcome

    # -- the steps -----------------------------------------------------------------
    def process(self):
        r = self.reader
        if r.error is not None:
            reply = {"bare": R.BARE_CRLF, "line": R.DATA_LINE_TOO_LONG,
                     "size": R.SIZE_EXCEEDED}[r.error].wire()
            self.rset_upstream()
            return self.done(reply, "blocked", "refused-" + r.error)
        self.body.flush()
        from smtpproxy import mime
        v = self.view
        self.structure = st = mime.split(self.body, self.p.spool, max_depth=v["max_mime_depth"],
                                         max_parts=v["max_mime_parts"])
        if v["scan"] == "encoded" and not st.has_encoded and not st.malformed:
            self.verdict = None
            return self.deliver(self.body, "Unscanned (no encoded portion)", "pass-unscanned")
        portions = [p for p in st.portions if p.size > 0]
        self.t_split = time.monotonic()
        verdicts = self.scan([self.body] + [p.path for p in portions])
        self.t_scan = time.monotonic()
        if verdicts is None:                                # deadline
            from scanlib.verdict import Unscannable
            verdicts = [Unscannable("unavailable", "scan deadline exceeded")]
            portions = []
        from scanlib.verdict import strongest
        self.whole = verdicts[0]
        self.parts = list(zip(portions, verdicts[1:]))
        self.verdict = strongest(verdicts)
        return self.decide()

    def scan(self, items):
        """Verdicts for items, or None when the deadline passed first."""
        from scanlib.scanner import Scanner
        self.scanner = scanner = Scanner.from_config(self.conf["scanner"])
        up = self.p.upstream
        quiet_upstream = up is None or up.kind != "smtp" or scanner.timeout < self.view["keepalive"]
        if len(items) == 1 and quiet_upstream and \
                scanner.timeout + scanner.connect_timeout < self.deadline - time.monotonic():
            # One scan that ends (its own timeout) before the deadline and
            # before any keep-alive is due: no worker thread needed.
            return scanner.scan_many(items)
        # A bare _thread worker: the threading module is not needed for one
        # worker and a lock, and its import cost every message ~0.7 ms (issue 7).
        # Like a daemon thread, it does not hold up the exit after a deadline.
        import _thread
        result = []
        finished = _thread.allocate_lock()
        finished.acquire()

        def work():
            try:
                result.extend(scanner.scan_many(items))
            finally:
                finished.release()

        _thread.start_new_thread(work, ())
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return None
            if finished.acquire(timeout=min(left, self.view["keepalive"])):
                return result if len(result) == len(items) else None
            self.p.keepalive()

    def decide(self):
        from scanlib import policy
        st = self.structure
        malformed = bool(st.malformed)
        d = policy.smtp(self.verdict, malformed, self.view, self.conf["scanner"])
        a = d.action
        if a == "deliver":
            return self.deliver(self.body, "Clean", "deliver")
        if a == "pass":
            return self.deliver(self.body, self.status_text(d.cause), "pass")
        if a in ("reject", "tempfail", "discard"):
            return self.block(d)
        if a == "hold":
            return self.hold(d)
        return self.remove(d)                                # strip replace quarantine

    def status_text(self, cause):
        if cause == "infected":
            return "Infected (%s), passed" % ", ".join(self.verdict.names)
        if cause == "malformed":
            return "Malformed MIME (%s), passed" % "; ".join(self.structure.malformed)
        if cause == "clean":
            return "Clean"
        return "Unscanned (%s), passed" % self.finding()

    def store(self, source, reason, action, portion=None, viruses=()):
        """Quarantine source; the id, or None when it could not be written."""
        from scanlib.quarantine import QuarantineError, Store
        st = self.structure
        meta = {
            "protocol": "smtp", "direction": self.p.direction, "client": self.p.peer_text,
            "sender": self.sess.sender.mailbox if self.sess.sender is not None else "",
            "recipients": [r.mailbox for r in self.sess.recipients],
            "subject": getattr(st, "subject", "") if st else "",
            "message_id": getattr(st, "message_id", "") if st else "",
            "viruses": list(viruses), "action": action, "reason": reason,
            "rule": self.rule(reason, action),
            "scanner_version": self.scanner.version() if self.scanner is not None else "",
        }
        if portion is not None:
            meta.update(portion=portion.index, content_type=portion.content_type,
                        filename=portion.filename)
        try:
            store = Store.from_config(self.conf["quarantine"])
            qid = store.add(source, meta)
        except (QuarantineError, OSError) as e:
            self.log.error("quarantine failed: %s", e)
            return None
        self.qids.append(qid)
        return qid

    def rule(self, reason, action):
        d = self.p.direction
        if reason == "infected":
            return "smtp.%s.action=%s" % (d, self.view["action"])
        if reason == "malformed":
            return "smtp.%s.on_malformed=%s" % (d, self.view["on_malformed"])
        if reason == "unscannable":
            key = "on_unavailable" if getattr(self.verdict, "reason", "") == "unavailable" \
                else "on_unscannable"
            return "scanner.%s=%s" % (key, self.conf["scanner"][key])
        return "smtp.%s.%s" % (d, action)

    def block(self, d):
        """reject / tempfail / discard: nothing delivered."""
        names = getattr(self.verdict, "names", ())
        if d.action in ("reject", "discard") and self.conf["quarantine"]["keep_blocked"]:
            qid = self.store(self.body, BLOCK_REASON.get(d.cause, "blocked"), d.action,
                             viruses=names)
            if qid is None and d.action == "discard":
                self.rset_upstream()
                return self.done(R.QUARANTINE_FAILED.wire(), "blocked", "tempfail-quarantine")
        self.rset_upstream()
        if d.action == "discard":
            text = "accepted and discarded: %s" % self.finding()
        elif d.cause == "malformed":
            text = "ambiguous MIME structure refused: %s" % "; ".join(self.structure.malformed)
        elif d.action == "tempfail":
            text = "cannot scan now, try again later: %s" % self.finding()
        else:
            text = "message refused: %s" % self.finding()
        return self.done(self.reply(d.code, d.status, text, self.details()), "blocked", d.action)

    def hold(self, d):
        """on_unscannable/on_malformed = quarantine: keep it, deliver nothing."""
        qid = self.store(self.body, BLOCK_REASON.get(d.cause, "blocked"), "quarantine",
                         viruses=getattr(self.verdict, "names", ()))
        self.rset_upstream()
        if qid is None:
            return self.done(R.QUARANTINE_FAILED.wire(), "blocked", "tempfail-quarantine")
        text = "held in quarantine as %s: %s" % (qid, self.finding())
        return self.done(self.reply(d.code, d.status, text), "blocked", "hold")

    def remove(self, d):
        """strip / replace / quarantine the infected portions, then deliver."""
        from scanlib.verdict import Infected, strongest
        from scanlib import policy
        from smtpproxy import rewrite as W
        action = d.action
        infected = [(p, v) for p, v in self.parts if isinstance(v, Infected)]
        found = set(n for _, v in infected for n in v.names)
        whole_names = set(getattr(self.whole, "names", ()))
        spans = None
        removals = []
        if infected and not self.structure.malformed and whole_names <= found:
            removals = [W.Removal(p, "infected: %s" % ", ".join(v.names)) for p, v in infected]
            spans = W.plan(removals)
        if spans is None:                       # the whole body goes
            removals = [W.Removal(None, self.finding())]
            remainder = []
        else:
            gone = set(id(r.portion) for r in removals)
            remainder = [v for p, v in self.parts if id(p) not in gone]
        # What stays must pass on its own (an unscanned remainder is never laundered).
        rest = strongest(remainder)
        if not rest.clean:
            rd = policy.smtp(rest, False, self.view, self.conf["scanner"])
            if rd.action in ("reject", "tempfail"):
                return self.block(rd)
            if rd.action == "hold":
                return self.hold(rd)
        if action == "quarantine":
            for r in removals:
                src = r.portion.path if r.portion is not None else self.body
                names = self.verdict.names
                qid = self.store(src, "infected", "quarantine", portion=r.portion, viruses=names)
                if qid is None:
                    self.rset_upstream()
                    return self.done(R.QUARANTINE_FAILED.wire(), "blocked",
                                     "tempfail-quarantine")
                r.qid = qid
        out = self.p.spool.create(prefix="vgw-out-")
        if spans is None:
            W.whole_body(self.body, self.structure, out, action, self.p.hostname, removals)
        else:
            W.rewrite(self.body, spans, out, action, self.p.hostname)
        out.flush()
        # What goes out is scanned once more: a rewrite keeps every byte it
        # does not replace (top-level header fields, preamble, epilogue), and
        # a virus there must never leave with a "removed" notice.
        check = self.scan([out])
        if check is None:
            from scanlib.verdict import Unscannable
            check = [Unscannable("unavailable", "scan deadline exceeded")]
        if isinstance(check[0], Infected):
            self.verdict = strongest([self.verdict, check[0]])
            self.log.info("rewritten message still infected (%s): refused", check[0])
            return self.block(policy.Decision("infected", "reject", 554, "5.7.1"))
        if not check[0].clean:
            rd = policy.smtp(check[0], False, self.view, self.conf["scanner"])
            if rd.action in ("reject", "tempfail"):
                return self.block(rd)
            if rd.action == "hold":
                return self.hold(rd)
        what = "body" if spans is None else "parts %s" % ",".join(
            r.portion.index for r in removals)
        status = "Infected (%s), %s %s" % (", ".join(self.verdict.names), what,
                                           {"strip": "removed", "replace": "replaced",
                                            "quarantine": "quarantined"}[action])
        return self.deliver(out, status, action)

    def deliver(self, f, status, action):
        from smtpproxy.rewrite import add_headers
        from smtpproxy.upstream import UpstreamError
        head = add_headers("", self.p.hostname, status) if self.view["add_headers"] else b""
        up = self.p.upstream
        try:
            if up is None or not up.alive:
                raise UpstreamError("upstream is gone")
            # on_unavailable = pass after a missed deadline still needs a moment
            # to hand the message over; the client waits 10 minutes (RFC 5321 4.5.3.2.6).
            code, lines = up.data(head, f, max(self.deadline, time.monotonic() + 30))
        except UpstreamError as e:
            self.log.warning("upstream failed during DATA: %s", e)
            self.p.end_reason = "upstream-lost"
            return self.done(R.UPSTREAM_LOST.wire(self.p.hostname), "lost", action,
                             "lost: %s" % e)
        up_text = "%d %s" % (code, " ".join(lines))
        if 200 <= code < 300:
            status_code = lines[-1].split(" ", 1)[0] if lines and lines[-1][:2] == "2." else ""
            note = "%s virusgw: %s" % (status_code or "2.0.0", status)
            return self.done(R.reply(code, [note] + lines), "delivered", action, up_text)
        self.rset_upstream()                    # whatever it kept of the transaction goes
        return self.done(R.reply(code, lines), "upstream-refused", action, up_text)

