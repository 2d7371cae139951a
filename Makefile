# virusgw: make demo | make test | make bench | make install
# Every target that needs them installs its own Debian packages (as root,
# noninteractively) and a venv in .venv; nothing here writes into /etc.

PYTHON    ?= /usr/bin/python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
APT_PKGS  ?= python3-venv clamav-daemon clamdscan exim4-daemon-light swaks vsftpd \
             lftp curl openbsd-inetd mandoc man-db systemd procps
PYTEST_ARGS ?=

.PHONY: all deps venv test demo bench install clean

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

test: venv
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

demo: venv
	$(VPY) tests/demo.py $(if $(KEEP),--keep,)

bench: venv
	$(VPY) tests/bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
