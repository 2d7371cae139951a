"""The floor: a Python program that only greets (run per connection, as
the proxies are).  It writes a 220 line, answers one command with 221 and
exits.  Its connect-to-greeting time is what a per-connection Python
program cannot beat."""
import os

os.write(1, b"220 floor ready\r\n")
os.read(0, 512)
os.write(1, b"221 bye\r\n")
