"""virusgw-smtpproxy: the scanning SMTP proxy, one process per connection.

main.py        the connection: config, privilege drop, greeting, the I/O loop, DATA
session.py     sans-I/O SMTP session: the command table, relay control, EHLO offer
address.py     strict RFC 5321 paths and ESMTP parameters; local_domains matching
replies.py     every reply the proxy makes, named, with enhanced status codes
datareader.py  strict DATA reader (CRLF.CRLF only, bare CR/LF refused), unstuffing
mime.py        streaming MIME/uuencode splitter with incremental decoders
message.py     one message after its final dot: scan, decide, act, deliver
rewrite.py     strip/replace/quarantine output and the X-Virus-* headers
upstream.py    the upstream MTA: sendmail:ARGV over pipes or smtp:HOST:PORT
"""
