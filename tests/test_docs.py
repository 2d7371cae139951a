"""The documentation and the shipped files agree with the code.

- every spec key is in etc/virusgw.conf (once, commented out with its
  default) and in virusgw.conf(5) (with the same default), and neither
  names a key the spec does not have; etc/virusgw.conf passes check-config;
- every bin/ program has its page; every page has the sections the issue
  asks for, is clean under `mandoc -T lint` and renders with `man -l`
  (groff warnings on); every CLI command and option is in virusgw(8), every
  FTP verb of the proxy's command table in virusgw-ftpproxy(8);
- the systemd units pass `systemd-analyze verify` with no output, alone and
  with the sendmail drop-in, and carry the settings the issue requires; the
  inetd and xinetd files name our programs with high spawn limits;
- the README's quick start is exactly `make demo` and `make test`.
"""

import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ETC = os.path.join(REPO, "etc")
MAN = os.path.join(REPO, "man")
SPEC = os.path.join(REPO, "scanlib", "virusgw.spec")
CONF = os.path.join(ETC, "virusgw.conf")
VENV_BIN = os.path.join(REPO, ".venv", "bin")
PAGES = ["virusgw.8", "virusgw-smtpproxy.8", "virusgw-ftpproxy.8", "virusgw.conf.5"]
SECTIONS = ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "CONFIGURATION", "ENVIRONMENT",
            "FILES", "EXIT STATUS", "EXAMPLES", "SECURITY", "SEE ALSO"]
UNITS = ["virusgw-smtpproxy.socket", "virusgw-smtpproxy@.service",
         "virusgw-ftpproxy.socket", "virusgw-ftpproxy@.service",
         "virusgw-smtpproxy-prefork.socket", "virusgw-smtpproxy-prefork.service"]


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# -- the spec -------------------------------------------------------------------

def spec_entries():
    """{(section or '', key): check string} from the spec, in file order."""
    out = {}
    section = ""
    for line in _read(SPEC).splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.match(r"^\[+\s*([^\]]+?)\s*\]+$", s)
        if m:
            section = m.group(1)
            continue
        key, _, check = s.partition("=")
        out[(section, key.strip())] = check.strip()
    return out


def spec_default_text(check):
    """The default of a spec check as the docs write it: list('a', 'b') ->
    'a, b'; '' and list() -> 'empty'."""
    m = re.search(r"default=(list\((.*?)\)|'([^']*)'|([^,)]+))", check)
    assert m, check
    if m.group(1).startswith("list("):
        items = re.findall(r"'([^']*)'", m.group(2))
        return ", ".join(items) if items else "empty"
    value = m.group(3) if m.group(3) is not None else m.group(4)
    return value.strip() if value.strip() else "empty"


def test_spec_parses_into_keys():
    keys = spec_entries()
    assert ("", "user") in keys and ("scanner", "clamd") in keys and ("ftp", "hostname") in keys


# -- etc/virusgw.conf -------------------------------------------------------------

def conf_settings():
    """{(section, key): [lines]} for `key = v` and `#key = v` lines (a
    commented-out setting has no space after '#'; prose comments do)."""
    out = {}
    section = ""
    for n, line in enumerate(_read(CONF).splitlines(), 1):
        m = re.match(r"^\s*\[+\s*([^\]]+?)\s*\]+\s*$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if m:
            out.setdefault((section, m.group(1)), []).append(n)
    return out


def test_every_spec_key_is_in_etc_conf_exactly_once():
    spec, conf = spec_entries(), conf_settings()
    missing = sorted("%s.%s" % k for k in spec if k not in conf)
    twice = sorted("%s.%s (lines %s)" % (k + (v,)) for k, v in conf.items() if len(v) > 1)
    stale = sorted("%s.%s" % k for k in conf if k not in spec)
    assert (missing, twice, stale) == ([], [], [])


def test_every_setting_in_etc_conf_is_commented_out_and_documented():
    lines = _read(CONF).splitlines()
    for (section, key), (n,) in conf_settings().items():
        assert lines[n - 1].startswith("#"), "%s.%s is set (line %d)" % (section, key, n)
        assert lines[n - 2].startswith("# ") or lines[n - 2].startswith("#" + "tls_cert"), \
            "%s.%s (line %d) has no comment above it" % (section, key, n)


def _load(path):
    from scanlib import config
    return config.load(path, cache=False)


def test_etc_conf_defaults_are_the_spec_defaults(tmp_path):
    uncommented = re.sub(r"(?m)^#([A-Za-z_][A-Za-z0-9_]*\s*=)", r"\1", _read(CONF))
    (tmp_path / "uncommented.conf").write_text(uncommented)
    (tmp_path / "empty.conf").write_text("")
    shown = _load(str(tmp_path / "uncommented.conf"))
    defaults = _load(str(tmp_path / "empty.conf"))
    for section in defaults:
        assert shown[section] == defaults[section], section
    assert dict(shown) == dict(defaults)


def test_etc_conf_passes_check_config():
    r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "check-config", "-c", CONF],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout.strip() == "%s: ok" % CONF


def test_a_broken_copy_fails_check_config(tmp_path):
    """The check above can fail: a bad value in a copy is reported."""
    broken = tmp_path / "broken.conf"
    broken.write_text(_read(CONF).replace("#method = auto", "method = telepathy"))
    r = subprocess.run([os.path.join(VENV_BIN, "virusgw"), "check-config", "-c", str(broken)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, VIRUSGW_CACHE_DIR=""))
    assert r.returncode == 78
    assert "section [scanner], key 'method'" in r.stderr


# -- virusgw.conf(5) ------------------------------------------------------------

def _plain(text):
    """Roff inline text to plain: font escapes dropped, \\- to -."""
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\(aq", "'").replace("\\e", "\\")


def conf5_keys():
    """{(section, key): default text} from the .TP entries of virusgw.conf(5)."""
    lines = _read(os.path.join(MAN, "virusgw.conf.5")).splitlines()
    out = {}
    section = None
    in_config = False
    for i, line in enumerate(lines):
        if line.startswith(".SH "):
            in_config = line.strip() == ".SH CONFIGURATION"
            section = None
            continue
        if not in_config:
            continue
        m = re.match(r'^\.SS "?(.*?)"?$', line)
        if m:
            name = m.group(1)
            section = "" if name == "Top level" else (
                name.strip("[]") if name.startswith("[") else None)
            continue
        if section is not None and line == ".TP" and i + 1 < len(lines):
            m = re.match(r"^\\fB([a-z_]+)\\fR = .*\(default: (.*?)(;.*)?\)$", lines[i + 1])
            assert m, "entry without '(default: ...)': %r" % lines[i + 1]
            out[(section, m.group(1))] = _plain(m.group(2))
    return out


def test_every_spec_key_is_in_conf5_with_its_default():
    spec, man = spec_entries(), conf5_keys()
    missing = sorted("%s.%s" % k for k in spec if k not in man)
    stale = sorted("%s.%s" % k for k in man if k not in spec)
    assert (missing, stale) == ([], [])
    wrong = ["%s.%s: man says %r, spec %r" % (k + (man[k], spec_default_text(spec[k])))
             for k in spec if man[k] != spec_default_text(spec[k])]
    assert wrong == []


# -- the pages --------------------------------------------------------------------

def test_every_program_has_its_page():
    programs = sorted(os.listdir(os.path.join(REPO, "bin")))
    assert programs == ["virusgw", "virusgw-ftpproxy", "virusgw-smtpproxy"]
    for prog in programs:
        page = os.path.join(MAN, prog + ".8")
        assert os.path.exists(page), prog
        text = _read(page)
        assert re.search(r"(?m)^\.TH %s 8 " % re.escape(prog.upper()), text), prog
        name = text.split(".SH NAME\n", 1)[1].splitlines()[0]
        assert _plain(name).startswith(prog + " - "), name


@pytest.mark.parametrize("page", PAGES)
def test_page_has_every_section_in_order(page):
    found = [_plain(m).strip('"') for m in
             re.findall(r"(?m)^\.SH (.+)$", _read(os.path.join(MAN, page)))]
    assert found == SECTIONS


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(page):
    if not shutil.which("mandoc"):
        pytest.fail("mandoc is not installed (make test installs it)")
    r = subprocess.run(["mandoc", "-T", "lint", os.path.join(MAN, page)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_man_renders_without_warnings(page):
    r = subprocess.run(["man", "--warnings", "-l", os.path.join(MAN, page)],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MANWIDTH="80", MANPAGER="cat", PAGER="cat",
                                LC_ALL="C.UTF-8"))
    assert (r.returncode, r.stderr) == (0, "")
    assert "SEE ALSO" in r.stdout and "EXAMPLES" in r.stdout
    assert len(r.stdout.splitlines()) > 50


def _commands(group, prefix=()):
    import click
    for name, cmd in sorted(group.commands.items()):
        path = prefix + (name,)
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path)
        else:
            yield path, cmd


def test_every_cli_command_and_option_is_in_virusgw8():
    from scanlib.cli import main
    text = _plain(_read(os.path.join(MAN, "virusgw.8")))
    subsections = dict(re.findall(r'(?ms)^\.SS "virusgw ([^"]+)"\n(.*?)(?=^\.S[SH] )', text))
    options = text.split("\n.SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    missing = []
    for path, cmd in _commands(main):
        name = " ".join(path)
        if name not in subsections:
            missing.append("command %r" % name)
            continue
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if not opt.startswith("--"):
                    continue
                where = options if opt in ("--config", "--help") else subsections[name]
                if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(opt), where):
                    missing.append("%s %s" % (name, opt))
    assert missing == []


def test_every_ftp_verb_is_in_the_ftpproxy_page():
    session = pytest.importorskip("ftpproxy.session")
    text = _plain(_read(os.path.join(MAN, "virusgw-ftpproxy.8")))
    commands = re.split(r"\n\.S[SH] ", text.split("\n.SS Commands\n", 1)[1], 1)[0]
    missing = [v for v in sorted(session.COMMANDS)
               if not re.search(r"(?<![A-Z])%s(?![A-Z])" % v, commands)]
    assert missing == []


# -- systemd units ------------------------------------------------------------------

def _man_tree(tmp_path):
    """MANPATH with our pages, so that Documentation=man:... resolves."""
    root = tmp_path / "man"
    for page in PAGES:
        sect = root / ("man" + page[-1])
        sect.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.join(MAN, page), str(sect / page))
    return str(root)


def _verify(directory, units, manpath):
    r = subprocess.run(["systemd-analyze", "verify"] + ["./" + u for u in units],
                       cwd=directory, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, MANPATH=manpath, SYSTEMD_LOG_COLOR="0"))
    return r.returncode, (r.stdout + r.stderr).strip()


def test_units_verify_as_shipped(tmp_path):
    """With the sendmail drop-in beside them, as in etc/systemd."""
    assert _verify(os.path.join(ETC, "systemd"), UNITS, _man_tree(tmp_path)) == (0, "")


def test_units_verify_alone_with_real_programs(tmp_path):
    """Without the drop-in, ExecStart pointing at the venv's launchers and
    its '-' removed, so that verify also checks the program exists."""
    d = tmp_path / "units"
    d.mkdir()
    for u in UNITS:
        text = _read(os.path.join(ETC, "systemd", u))
        text = text.replace("ExecStart=-/usr/local/sbin/", "ExecStart=%s/" % VENV_BIN)
        (d / u).write_text(text)
    assert _verify(str(d), UNITS, _man_tree(tmp_path)) == (0, "")


def test_verify_can_fail(tmp_path):
    """The two checks above would notice a bad setting."""
    d = tmp_path / "units"
    d.mkdir()
    text = _read(os.path.join(ETC, "systemd", UNITS[1])) + "ProtectSystem=sometimes\n"
    (d / UNITS[1]).write_text(text)
    rc, out = _verify(str(d), [UNITS[1]], _man_tree(tmp_path))
    assert "sometimes" in out


def unit(name):
    """{section: {key: [values]}} of a shipped unit or drop-in."""
    cp = configparser.RawConfigParser(strict=False, delimiters=("=",), comment_prefixes=("#",),
                                      dict_type=_MultiDict, empty_lines_in_values=False)
    cp.optionxform = str
    cp.read(os.path.join(ETC, "systemd", name))
    return {s: {k: (v if isinstance(v, list) else [v]) for k, v in cp.items(s)}
            for s in cp.sections()}


class _MultiDict(dict):
    """configparser dict that keeps every value of a repeated key."""
    def __setitem__(self, key, value):
        if isinstance(value, list) and key in self and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


@pytest.mark.parametrize("proto", ["smtp", "ftp"])
def test_units_carry_the_required_settings(proto):
    sock = unit("virusgw-%sproxy.socket" % proto)["Socket"]
    assert sock["Accept"] == ["yes"]
    assert int(sock["MaxConnections"][0]) >= 50
    assert 1 <= int(sock["MaxConnectionsPerSource"][0]) < int(sock["MaxConnections"][0])
    svc = unit("virusgw-%sproxy@.service" % proto)["Service"]
    assert svc["ExecStart"] == ["-/usr/local/sbin/virusgw-%sproxy" % proto]
    for key, value in [("StandardInput", "socket"), ("StandardError", "journal"),
                       ("User", "virusgw"), ("NoNewPrivileges", "yes"),
                       ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("PrivateDevices", "yes")]:
        assert svc[key] == [value], key
    rw = " ".join(svc["ReadWritePaths"]).split()
    assert "/var/spool/virusgw" in rw and "/var/lib/virusgw/quarantine" in rw
    families = " ".join(svc["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)


def test_sendmail_dropin_undoes_what_breaks_a_setuid_mta():
    svc = unit("virusgw-smtpproxy@.service.d/sendmail.conf")["Service"]
    assert svc["NoNewPrivileges"] == ["no"]
    assert svc["CapabilityBoundingSet"] == ["~"]
    assert svc["KillMode"] == ["process"]
    rw = " ".join(svc["ReadWritePaths"]).split()
    assert "-/var/spool/exim4" in rw and "-/var/spool/postfix/maildrop" in rw


def test_units_and_config_name_the_same_directories():
    """ReadWritePaths cover the default spool and quarantine of the spec."""
    spec = spec_entries()
    for key in (("spool", "directory"), ("quarantine", "directory")):
        default = spec_default_text(spec[key])
        for proto in ("smtp", "ftp"):
            rw = " ".join(unit("virusgw-%sproxy@.service" % proto)["Service"]["ReadWritePaths"])
            assert default in rw.split()
    from scanlib import config
    for proto in ("smtp", "ftp"):
        rw = " ".join(unit("virusgw-%sproxy@.service" % proto)["Service"]["ReadWritePaths"])
        assert "-" + config.DEFAULT_CACHE_DIR in rw.split()


# -- inetd, xinetd ---------------------------------------------------------------------

def inetd_lines(path=os.path.join(ETC, "inetd.conf")):
    return [line.split() for line in _read(path).splitlines()
            if line.strip() and not line.startswith("#")]


def test_inetd_lines():
    lines = inetd_lines()
    assert [l[0] for l in lines] == ["smtp", "ftp"]
    for fields in lines:
        service, socktype, proto, wait, user, program, argv0 = fields[:7]
        assert (socktype, proto) == ("stream", "tcp")
        m = re.match(r"^nowait\.(\d+)$", wait)
        assert m and int(m.group(1)) >= 1000, wait
        assert program == "/usr/local/sbin/" + argv0
        assert argv0 in os.listdir(os.path.join(REPO, "bin"))
        assert user == "virusgw"
    text = _read(os.path.join(ETC, "inetd.conf"))
    for fields in lines:     # the update-inetd commands add exactly these lines
        assert "--add '%s'" % " ".join(fields) in text


def test_services_names():
    names = [l.split()[:2] for l in _read(os.path.join(ETC, "services")).splitlines()
             if l.strip() and not l.startswith("#")]
    assert names == [["virusgw-smtp", "10025/tcp"], ["virusgw-ftp", "10021/tcp"]]


def test_xinetd_snippet():
    text = _read(os.path.join(ETC, "xinetd.d", "virusgw"))
    services = re.findall(r"(?ms)^service (\w+)\s*\{(.*?)^\}", text)
    assert [s for s, _ in services] == ["smtp", "ftp"]
    for name, body in services:
        attrs = dict(re.findall(r"(?m)^\s*(\w+)\s*\+?=\s*(.*?)\s*$", body))
        assert attrs["wait"] == "no" and attrs["user"] == "virusgw"
        assert attrs["server"] == "/usr/local/sbin/virusgw-%sproxy" % name
        assert int(attrs["instances"]) >= 50 and int(attrs["per_source"]) >= 1


# -- README ----------------------------------------------------------------------------

def test_readme_quick_start_is_two_commands():
    text = _read(os.path.join(REPO, "README.md"))
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [l.strip().split("#")[0].strip() for l in quick.splitlines()
                if l.startswith("    ") and l.strip()]
    assert commands == ["make demo", "make test"]


def test_readme_links_every_page():
    text = _read(os.path.join(REPO, "README.md"))
    for page in PAGES:
        assert "man/%s" % page in text, page


@pytest.mark.parametrize("program,module", [("virusgw-smtpproxy", "smtpproxy"),
                                            ("virusgw-ftpproxy", "ftpproxy")])
def test_proxy_options_are_the_documented_ones(program, module):
    """The options the proxies' argument loop (scanlib.config.proxy_args,
    which main.py calls) knows are those the proxy's page lists."""
    assert "proxy_args(" in _read(os.path.join(REPO, module, "main.py"))
    source = _read(os.path.join(REPO, "scanlib", "config.py"))
    source = source.split("def proxy_args(", 1)[1].split("\ndef ", 1)[0]
    known = set(re.findall(r'a == "(-[a-zA-Z])"', source))
    assert known, "no option handling found in scanlib.config.proxy_args"
    text = _read(os.path.join(MAN, program + ".8"))
    options = text.split("\n.SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    documented = set(re.findall(r"(?m)^\.BI? \\(-[a-zA-Z])\b", options))
    documented = {o.replace("\\", "") for o in documented}
    assert documented == known
    synopsis = _plain(text.split("\n.SH SYNOPSIS\n", 1)[1].split("\n.SH ", 1)[0])
    for opt in known:
        assert opt in synopsis


def _replies_section(page):
    text = _plain(_read(os.path.join(MAN, page)))
    return text.split("\n.SS Replies of the proxy's own\n", 1)[1].split("\n.SS ", 1)[0]


def test_every_smtp_error_reply_is_documented():
    """Every 4xx/5xx reply the SMTP proxy makes itself is in its page."""
    codes = set(int(c) for c in re.findall(r"\bR\((\d{3}),", _read(
        os.path.join(REPO, "smtpproxy", "replies.py"))))
    documented = set(int(c) for c in re.findall(r"(?<![\d.])([45]\d\d)(?![\d.])",
                                                _replies_section("virusgw-smtpproxy.8")))
    assert sorted(c for c in codes if c >= 400 and c not in documented) == []


def test_every_ftp_error_reply_is_documented():
    """Every 4xx/5xx reply the FTP proxy makes itself is in its page."""
    source = "".join(_read(os.path.join(REPO, "ftpproxy", n)) for n in sorted(
        os.listdir(os.path.join(REPO, "ftpproxy"))) if n.endswith(".py"))
    codes = set(int(c) for c in re.findall(r"\b_?r\((\d{3})\b", source))
    codes |= set(int(c) for c in re.findall(r"CommandError\((\d{3})", source))
    documented = set(int(c) for c in re.findall(r"(?<![\d.])([45]\d\d)(?![\d.])",
                                                _replies_section("virusgw-ftpproxy.8")))
    assert sorted(c for c in codes if c >= 400 and c not in documented) == []
