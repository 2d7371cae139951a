"""virusgw's protocol-free core: config, clamd scanner, verdicts, policy,
spool, quarantine store, file-type rules and logging.

Nothing here speaks SMTP or FTP.  Modules import lazily what they need so
that a proxy's start-up pays only for what its connection uses.
"""

__version__ = "0.1.0"
