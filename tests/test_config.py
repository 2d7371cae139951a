"""scanlib.config: every kind of configuration error with its exact message
(file, line, section, key), defaults from the spec, [[inbound]]/[[outbound]]
overrides, the cross-key check, the lookup order, the cache, the shipped
etc/virusgw.conf, and the endpoint/host:port parsers under hostile input."""

import os
import subprocess

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from scanlib import config
from scanlib.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIRUSGW = os.path.join(REPO, ".venv", "bin", "virusgw")


@pytest.fixture(autouse=True)
def no_cache(monkeypatch):
    """No test reads or writes /var/cache/virusgw."""
    monkeypatch.setenv("VIRUSGW_CACHE_DIR", "")


@pytest.fixture
def conf_file(tmp_path):
    def write(text, name="virusgw.conf", raw=False):
        p = tmp_path / name
        p.write_bytes(text if raw else text.encode())
        return str(p)
    return write


def problems(path):
    with pytest.raises(config.ConfigError) as e:
        config.load(path, cache=False)
    return e.value.problems


# (config text, [expected problems with {p} for the path])
ERRORS = {
    "syntax": ("[scanner]\nthis is not valid\n",
               ["{p}:2: Invalid line ('this is not valid') (matched as neither section "
                "nor keyword) at line 2."]),
    "unclosed-section": ("[smtp\nx = 1\n",
                         ["{p}:1: Invalid line ('[smtp') (matched as neither section nor "
                          "keyword) at line 1."]),
    "duplicate-section": ("[scanner]\ntimeout = 3\n[scanner]\ntimeout = 4\n",
                          ["{p}:3: Duplicate section name at line 3.",
                           "{p}:4: Duplicate keyword name at line 4."]),
    "duplicate-key": ("[scanner]\ntimeout = 3\ntimeout = 4\n",
                      ["{p}:3: Duplicate keyword name at line 3."]),
    "unknown-top-key": ("colour = blue\n",
                        ["{p}:1: section top level, key 'colour': unknown key"]),
    "unknown-key": ("[scanner]\n# comment\ncolour = blue\n",
                    ["{p}:3: section [scanner], key 'colour': unknown key"]),
    "unknown-section": ("[log]\n[nosuch]\nx = 1\n",
                        ["{p}:2: section [nosuch]: unknown section"]),
    "unknown-subsection": ("[smtp]\n  [[sideways]]\n  action = pass\n",
                           ["{p}:2: section [smtp][sideways]: unknown section"]),
    "subsection-where-none-allowed": ("[scanner]\n  [[inbound]]\n  timeout = 3\n",
                                      ["{p}:2: section [scanner][inbound]: unknown section"]),
    "unknown-key-in-override": ("[ftp]\n  [[inbound]]\n  nonsense = 1\n",
                                ["{p}:3: section [ftp][inbound], key 'nonsense': unknown key"]),
    "option": ("[scanner]\nmethod = carrier\n",
               ['{p}:2: section [scanner], key \'method\': "carrier" is not one of: '
                'auto, fildes, stream, path']),
    "option-in-override": ("[smtp]\n[[outbound]]\naction = explode\n",
                           ['{p}:3: section [smtp][outbound], key \'action\': "explode" is not '
                            'one of: pass, reject, discard, strip, replace, quarantine']),
    "option-as-list": ("[scanner]\nmethod = fildes, stream\n",
                       ["{p}:2: section [scanner], key 'method': expected one value, not a list "
                        "(quote it)"]),
    "integer-type": ("[quarantine]\nmax_total_size = lots\n",
                     ['{p}:2: section [quarantine], key \'max_total_size\': "lots" is not a '
                      'whole number']),
    "integer-too-big": ("[smtp]\nmax_recipients = 100001\n",
                        ['{p}:2: section [smtp], key \'max_recipients\': "100001" is too big: '
                         'the maximum is 100000']),
    "float-too-small": ("[scanner]\ntimeout = 0.5\n",
                        ['{p}:2: section [scanner], key \'timeout\': "0.5" is too small: '
                         'the minimum is 1']),
    "float-type": ("[ftp]\ntimeout = soon\n",
                   ['{p}:2: section [ftp], key \'timeout\': "soon" is not a number']),
    "boolean": ("[smtp]\nadd_headers = perhaps\n",
                ['{p}:2: section [smtp], key \'add_headers\': "perhaps" is not yes or no']),
    "endpoint-relative": ("[scanner]\nclamd = unix:relative/path\n",
                          ["{p}:2: section [scanner], key 'clamd': unix socket path must be "
                           "absolute: 'unix:relative/path'"]),
    "endpoint-no-port": ("[scanner]\nclamd = tcp:localhost\n",
                         ["{p}:2: section [scanner], key 'clamd': tcp endpoint needs a port: "
                          "'tcp:localhost'"]),
    "endpoint-kind": ("[scanner]\nclamd = /run/clamav/clamd.ctl\n",
                      ["{p}:2: section [scanner], key 'clamd': endpoint must be unix:PATH, "
                       "tcp:HOST:PORT or tcp:[V6]:PORT, not '/run/clamav/clamd.ctl'"]),
    "endpoint-bad-port": ("[scanner]\nclamd = tcp:127.0.0.1:99999\n",
                          ["{p}:2: section [scanner], key 'clamd': bad port in "
                           "'127.0.0.1:99999'"]),
    "endpoint-empty": ("[scanner]\nclamd = ,\n",
                       ["{p}:2: section [scanner], key 'clamd': at least one clamd endpoint "
                        "is needed"]),
    "endpoint-colons": ("[scanner]\nclamd = tcp:a:b:3310\n",
                        ["{p}:2: section [scanner], key 'clamd': bad host in 'a:b:3310' (write "
                         "an IPv6 address with a port as [V6]:PORT)"]),
    "network": ("[networks]\ninside = 10.0.0.0/8, 10.0.0.0/33\n",
                ["{p}:2: section [networks], key 'inside': not a network: '10.0.0.0/33'"]),
    "domain": ("[smtp]\nlocal_domains = example.com, exa mple.com\n",
               ["{p}:2: section [smtp], key 'local_domains': not a domain: 'exa mple.com'"]),
    "smtp-upstream-kind": ("[smtp]\nupstream = ftp:x\n",
                           ["{p}:2: section [smtp], key 'upstream': must be sendmail:ARGV or "
                            "smtp:HOST:PORT, not 'ftp:x'"]),
    "smtp-upstream-list": ("[smtp]\nupstream = sendmail:/usr/sbin/sendmail -bs, smtp:x\n",
                           ["{p}:2: section [smtp], key 'upstream': expected one value, not a "
                            "list (quote it)"]),
    "smtp-upstream-relative": ("[smtp]\nupstream = sendmail:sendmail -bs\n",
                               ["{p}:2: section [smtp], key 'upstream': sendmail: needs an "
                                "absolute program path"]),
    "ftp-upstream": ("[ftp]\nupstream = command:vsftpd\n",
                     ["{p}:2: section [ftp], key 'upstream': command: needs an absolute "
                      "program path"]),
    "port-range": ("[ftp]\npassive_ports = 10-20\n",
                   ["{p}:2: section [ftp], key 'passive_ports': port range must lie within "
                    "1024-65535, low <= high"]),
    "port-range-shape": ("[ftp]\npassive_ports = 30000\n",
                         ["{p}:2: section [ftp], key 'passive_ports': expected LOW-HIGH, "
                          "not '30000'"]),
    "duration": ("[quarantine]\nmax_age = 3 fortnights\n",
                 ["{p}:2: section [quarantine], key 'max_age': expected a duration like 30d, "
                  "12h, 15m or seconds, not '3 fortnights'"]),
    "cross-key": ("[scanner]\nmax_size = 1000\n[smtp]\nmax_message_size = 2000\n",
                  ["{p}:4: section [smtp], key 'max_message_size': 2000 exceeds [scanner] "
                   "max_size (1000): bigger messages could not be scanned"]),
    # the default max_message_size (the file has no [smtp]: no line to name)
    "cross-key-default": ("[scanner]\nmax_size = 1000\n",
                          ["{p}: section [smtp], key 'max_message_size': 52428800 exceeds "
                           "[scanner] max_size (1000): bigger messages could not be scanned"]),
    "cross-key-override": ("[scanner]\nmax_size = 1000\n[smtp]\nmax_message_size = 900\n"
                           "  [[inbound]]\n  max_message_size = 5000\n",
                           ["{p}:6: section [smtp][inbound], key 'max_message_size': 5000 "
                            "exceeds [scanner] max_size (1000): bigger messages could not be "
                            "scanned"]),
}


@pytest.mark.parametrize("kind", sorted(ERRORS))
def test_each_kind_of_error_has_its_exact_message(conf_file, kind):
    text, want = ERRORS[kind]
    p = conf_file(text)
    assert problems(p) == [w.format(p=p) for w in want]


def test_file_level_errors(conf_file, tmp_path):
    missing = str(tmp_path / "missing.conf")
    assert problems(missing) == ["%s: cannot read: No such file or directory" % missing]
    d = tmp_path / "dir.conf"
    d.mkdir()
    assert problems(str(d)) == ["%s: not a regular file" % d]
    p = conf_file(b"[log]\nfile = /var/log/x\n# caf\xe9\n", raw=True)
    assert problems(p) == ["%s:3: not UTF-8 text" % p]


def test_every_problem_is_listed_in_line_order(conf_file):
    text = ("bogus = 1\n"
            "[scanner]\n"
            "method = carrier\n"
            "timeout = 0\n"
            "colour = blue\n"
            "[smtp]\n"
            "action = explode\n"
            "  [[inbound]]\n"
            "  nonsense = 1\n"
            "[ftp]\n"
            "passive_ports = 1-2\n"
            "[nosuch]\n")
    p = conf_file(text)
    got = problems(p)
    assert [int(g.split(":")[1]) for g in got] == [1, 3, 4, 5, 7, 9, 11, 12]
    assert all(g.startswith(p + ":") for g in got)


def test_defaults_come_from_the_spec(conf_file):
    c = config.load(conf_file(""), cache=False)
    assert c["scanner"]["clamd"] == ["unix:/run/clamav/clamd.ctl"]
    assert c["scanner"]["method"] == "auto"
    assert c["scanner"]["timeout"] == 120.0
    assert c["scanner"]["max_size"] == 104857600
    assert c["scanner"]["parallel"] == 4
    assert c["scanner"]["on_unavailable"] == "tempfail"
    assert c["scanner"]["on_unscannable"] == "reject"
    assert c["smtp"]["action"] == "reject"
    assert c["smtp"]["max_message_size"] == 52428800
    assert c["ftp"]["action"] == "delete"
    assert c["ftp"]["passive_ports"] == (30000, 30999)
    assert c["quarantine"]["max_age"] == 30 * 86400
    assert "fc00::/7" in c["networks"]["inside"]
    # the overrides hold nothing that was not written
    for proto in ("smtp", "ftp"):
        for d in ("inbound", "outbound"):
            assert set(c[proto][d].values()) == {None}


def test_values_are_typed_and_normalised(conf_file):
    c = config.load(conf_file(
        "[scanner]\nclamd = unix:/a/b, tcp:[::1]:3310, tcp:clamd.example:3310\n"
        "[smtp]\nlocal_domains = Example.COM., .Sub.Example.org\n"
        "[ftp]\npassive_ports = 40000 - 40010\n"
        "[quarantine]\nmax_age = 12h\n"), cache=False)
    assert c["scanner"]["clamd"] == ["unix:/a/b", "tcp:[::1]:3310", "tcp:clamd.example:3310"]
    assert c["smtp"]["local_domains"] == ["example.com", ".sub.example.org"]
    assert c["ftp"]["passive_ports"] == (40000, 40010)
    assert c["quarantine"]["max_age"] == 43200


def test_overrides_merge_over_the_base_section(conf_file):
    c = config.load(conf_file(
        "[smtp]\naction = quarantine\ntimeout = 60\n"
        "  [[inbound]]\n  action = reject\n"
        "  [[outbound]]\n  timeout = 30\n  add_headers = no\n"
        "[ftp]\naction = quarantine\n"
        "  [[outbound]]\n  action = pass\n"), cache=False)
    base = c.view("smtp")
    inbound = c.view("smtp", "inbound")
    outbound = c.view("smtp", "outbound")
    assert (base["action"], base["timeout"], base["add_headers"]) == ("quarantine", 60.0, True)
    assert (inbound["action"], inbound["timeout"], inbound["add_headers"]) == \
        ("reject", 60.0, True)
    assert (outbound["action"], outbound["timeout"], outbound["add_headers"]) == \
        ("quarantine", 30.0, False)
    assert "inbound" not in inbound and "outbound" not in base
    # an override not written for a key leaves the base value (never a spec default)
    assert inbound["max_message_size"] == base["max_message_size"]
    assert c.view("ftp", "outbound")["action"] == "pass"
    assert c.view("ftp", "inbound")["action"] == "quarantine"
    assert c.view("ftp", None)["action"] == "quarantine"
    assert c.view("smtp", "sideways") == base


def test_lookup_order(conf_file, monkeypatch, tmp_path):
    assert config.find_path("/x.conf", {"VIRUSGW_CONF": "/y.conf"}) == "/x.conf"
    assert config.find_path(None, {"VIRUSGW_CONF": "/y.conf"}) == "/y.conf"
    assert config.find_path(None, {}) == "/etc/virusgw.conf"
    assert config.find_path(None, {"VIRUSGW_CONF": ""}) == "/etc/virusgw.conf"
    a = conf_file("[scanner]\ntimeout = 11\n", name="a.conf")
    b = conf_file("[scanner]\ntimeout = 22\n", name="b.conf")
    monkeypatch.setenv("VIRUSGW_CONF", b)
    assert config.load(a, cache=False)["scanner"]["timeout"] == 11
    assert config.load(None, cache=False)["scanner"]["timeout"] == 22
    assert config.load(None, cache=False).path == b
    monkeypatch.delenv("VIRUSGW_CONF")
    if not os.path.exists("/etc/virusgw.conf"):
        assert problems(None) == ["/etc/virusgw.conf: cannot read: No such file or directory"]


def test_check_config_cli(conf_file, monkeypatch):
    good = conf_file("[scanner]\ntimeout = 3\n", name="good.conf")
    bad = conf_file("[scanner]\ntimeout = 0\nbogus = 1\n", name="bad.conf")
    r = CliRunner().invoke(main, ["check-config", "-c", good])
    assert (r.exit_code, r.output) == (0, "%s: ok\n" % good)
    r = CliRunner().invoke(main, ["check-config", "-c", bad])
    assert r.exit_code == 78
    assert r.output.splitlines() == [
        'virusgw: %s:2: section [scanner], key \'timeout\': "0" is too small: the minimum is 1'
        % bad,
        "virusgw: %s:3: section [scanner], key 'bogus': unknown key" % bad]
    monkeypatch.setenv("VIRUSGW_CONF", bad)
    assert CliRunner().invoke(main, ["check-config"]).exit_code == 78
    assert CliRunner().invoke(main, ["check-config", "-c", good]).exit_code == 0


def test_shipped_example_config_passes_check_config():
    """etc/virusgw.conf (every key with its default) is valid as shipped,
    through the installed command."""
    path = os.path.join(REPO, "etc", "virusgw.conf")
    r = subprocess.run([VIRUSGW, "check-config", "-c", path], capture_output=True, text=True,
                       env=dict(os.environ, VIRUSGW_CACHE_DIR=""), timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert r.stdout == "%s: ok\n" % path
    # a broken copy gives precise messages
    with open(path) as f:
        text = f.read()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        broken = os.path.join(d, "virusgw.conf")
        with open(broken, "w") as f:
            f.write(text + "\n[scanner]\n")       # a second [scanner]: duplicate section
        r = subprocess.run([VIRUSGW, "check-config", "-c", broken], capture_output=True,
                           text=True, env=dict(os.environ, VIRUSGW_CACHE_DIR=""), timeout=60)
        assert r.returncode == 78
        assert "Duplicate section name" in r.stderr and broken in r.stderr


def test_cache(conf_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("VIRUSGW_CACHE_DIR", str(cache))
    p = conf_file("[scanner]\ntimeout = 5\n")
    assert config.load(p)["scanner"]["timeout"] == 5
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert config.load(p)["scanner"]["timeout"] == 5
    # a changed file is read again (size and mtime change)
    with open(p, "w") as f:
        f.write("[scanner]\ntimeout = 77\n")
    assert config.load(p)["scanner"]["timeout"] == 77
    # a broken file is never served from the cache
    with open(p, "w") as f:
        f.write("[scanner]\ntimeout = 0\n")
    with pytest.raises(config.ConfigError):
        config.load(p)
    # a cache others can write is ignored
    with open(p, "w") as f:
        f.write("[scanner]\ntimeout = 8\n")
    assert config.load(p)["scanner"]["timeout"] == 8
    for f in cache.iterdir():
        os.chmod(f, 0o666)
    with open(p, "a") as f:
        f.write("# touched\n")
    assert config.load(p)["scanner"]["timeout"] == 8


# -- parsers under hostile input ----------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("unix:/run/clamav/clamd.ctl", ("unix", "/run/clamav/clamd.ctl")),
    ("tcp:127.0.0.1:3310", ("tcp", "127.0.0.1", 3310)),
    ("tcp:[::1]:3310", ("tcp", "::1", 3310)),
    ("tcp:[fe80::1%eth0]:3310", ("tcp", "fe80::1%eth0", 3310)),
    ("tcp:clamd.example.com:1", ("tcp", "clamd.example.com", 1)),
])
def test_parse_endpoint(text, want):
    assert config.parse_endpoint(text) == want


@pytest.mark.parametrize("text", [
    "unix:", "unix:rel", "tcp:", "tcp:host", "tcp:host:0", "tcp:host:65536", "tcp:[::1]",
    "tcp:[::1", "tcp:[::1]x:3", "tcp:::1:3310", "tcp:a:b:c", "tcp:ho st:1", "tcp::1",
    "udp:x:1", "", "tcp:h:-1", "tcp:h:1e3",
])
def test_parse_endpoint_rejects(text):
    with pytest.raises(ValueError):
        config.parse_endpoint(text)


@given(st.text(max_size=60))
def test_parsers_raise_only_valueerror(text):
    for fn in (config.parse_endpoint, lambda t: config.split_hostport(t, 21),
               config.parse_duration):
        try:
            fn(text)
        except ValueError:
            pass


@given(st.sampled_from(["127.0.0.1", "::1", "2001:db8::5", "host.example", "a-b_c.d"]),
       st.integers(min_value=1, max_value=65535))
def test_split_hostport_roundtrip(host, port):
    text = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
    assert config.split_hostport(text, None) == (host, port)
    assert config.split_hostport("[%s]" % host if ":" in host else host, 21) == (host, 21)


@pytest.mark.parametrize("text,want", [
    ("30d", 2592000), ("12h", 43200), ("15m", 900), ("90s", 90), ("2w", 1209600), ("45", 45),
    (" 7d ", 604800),
])
def test_parse_duration(text, want):
    assert config.parse_duration(text) == want


@pytest.mark.parametrize("text", ["", "d", "1y", "-1d", "1.5h", "1 d 2"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        config.parse_duration(text)


def test_empty_list_value_is_an_empty_list(tmp_path):
    """`key =` for a list key is [] (configobj's force_list gives [''])."""
    p = tmp_path / "v.conf"
    p.write_text("[ftp]\nskip_extensions =\nallowed_upstreams = a.example, b.example\n"
                 "site_allow = ,\n  [[inbound]]\n  skip_extensions = .txt\n")
    conf = config.load(str(p), cache=False)
    assert conf["ftp"]["skip_extensions"] == []
    assert conf["ftp"]["allowed_upstreams"] == ["a.example", "b.example"]
    assert conf["ftp"]["site_allow"] == []
    assert conf.view("ftp", "inbound")["skip_extensions"] == [".txt"]
    assert conf.view("ftp", "outbound")["skip_extensions"] == []


def test_check_config_knows_unknown_accounts(tmp_path):
    """A user or quarantine group missing on this host is a problem (78)."""
    from click.testing import CliRunner
    p = tmp_path / "v.conf"
    p.write_text("user = nosuchuser-vgw\n[quarantine]\ngroup = nosuchgroup-vgw\n")
    r = CliRunner().invoke(main, ["check-config", "-c", str(p)])
    assert r.exit_code == 78
    assert "key 'user': no such user 'nosuchuser-vgw'" in r.output
    assert "key 'group': no such group 'nosuchgroup-vgw'" in r.output
    p.write_text("user = root\n[quarantine]\ngroup = root\n")
    r = CliRunner().invoke(main, ["check-config", "-c", str(p)])
    assert r.exit_code == 0, r.output
