# virusgw: make demo | make test | make bench | make install
# Every target that needs them installs its own Debian packages (as root,
# noninteractively) and a venv in .venv; nothing here writes into /etc.

PYTHON    ?= /usr/bin/python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
# One inetd only: openbsd-inetd (xinetd conflicts with it).
APT_PKGS  ?= python3-venv clamav-daemon clamdscan exim4-daemon-light swaks vsftpd \
             lftp curl openbsd-inetd mandoc man-db systemd procps passwd \
             time openssl
PYTEST_ARGS ?=
# The unprivileged account the privilege-drop tests run the proxies as
# (tests/test_privs.py, tests/test_inetd.py), and an extra group it belongs
# to so that the tests can check supplementary groups too.
TEST_USER  ?= virusgw-test
TEST_GROUP2 ?= virusgw-test2
# make install: a venv of its own under PREFIX, launchers linked into BINDIR.
PREFIX    ?= /opt/virusgw
BINDIR    ?= /usr/local/sbin
MANDIR    ?= /usr/local/share/man

.PHONY: all deps venv testuser test demo bench install clean

all: test

deps:
	@missing=$$(for p in $(APT_PKGS); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root for apt-get (or install: $$missing)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold $$missing >/dev/null; \
	fi

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade "setuptools>=64" pip
	$(VPY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

venv: deps $(VENV)/.installed
	@# Byte-compile our packages: every proxy start would otherwise compile
	@# them again (editable install; PYTHONDONTWRITEBYTECODE may be set).
	@$(VPY) -m compileall -q scanlib smtpproxy ftpproxy >/dev/null

# As root: create the test account (a system user with its own group plus
# TEST_GROUP2).  Not root: the privilege tests skip, saying so.
testuser:
	@if [ "$$(id -u)" = 0 ]; then \
	  getent group $(TEST_GROUP2) >/dev/null || groupadd --system $(TEST_GROUP2); \
	  id -u $(TEST_USER) >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
	    --home-dir /nonexistent --shell /usr/sbin/nologin $(TEST_USER); \
	  id -nG $(TEST_USER) | tr ' ' '\n' | grep -qx $(TEST_GROUP2) || usermod -a -G $(TEST_GROUP2) $(TEST_USER); \
	fi

test: venv testuser
	VIRUSGW_TEST_USER=$(TEST_USER) VIRUSGW_TEST_GROUP2=$(TEST_GROUP2) \
	  $(VPY) -m pytest -q $(PYTEST_ARGS) tests

# make demo [KEEP=1] [CLAMD=unix:/run/clamav/clamd.ctl | CONF=/etc/virusgw.conf]:
# CLAMD or CONF use that clamd (real signatures) when it answers, instead of
# a private one with the test signatures.
demo: venv
	$(VPY) tests/demo.py $(if $(KEEP),--keep,) $(if $(CLAMD),--clamd $(CLAMD),) $(if $(CONF),--config $(CONF),)

bench: venv
	$(VPY) tests/bench/run.py $(BENCH_ARGS)

# A real host: the package in its own venv under PREFIX (not editable),
# the three programs linked into BINDIR, the man pages into MANDIR.
# /etc is never written: copy etc/virusgw.conf yourself, then run
# `virusgw setup` (see README.md and virusgw(8)).
install:
	$(PYTHON) -c 'import venv, ensurepip' || { echo 'need python3-venv (apt-get install python3-venv)'; exit 1; }
	test -x $(PREFIX)/bin/python || $(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/python -m pip install -q --upgrade "setuptools>=64" pip
	$(PREFIX)/bin/python -m pip install -q .
	rm -rf build virusgw.egg-info
	install -d $(BINDIR) $(MANDIR)/man5 $(MANDIR)/man8
	for p in virusgw virusgw-smtpproxy virusgw-ftpproxy; do \
	  ln -sf $(PREFIX)/bin/$$p $(BINDIR)/$$p; done
	install -m 0644 man/virusgw.8 man/virusgw-smtpproxy.8 man/virusgw-ftpproxy.8 $(MANDIR)/man8/
	install -m 0644 man/virusgw.conf.5 $(MANDIR)/man5/
	@echo "next: cp etc/virusgw.conf /etc/virusgw.conf; edit it; $(BINDIR)/virusgw setup"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
