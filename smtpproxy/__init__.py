"""virusgw-smtpproxy: see smtpproxy.main."""
