"""virusgw-ftpproxy: see ftpproxy.main."""
