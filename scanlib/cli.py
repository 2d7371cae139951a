"""virusgw: the administrator's command line (click).

Only the CLI imports click; the proxies never do.  Exit codes (ExitCode)
are an interface: 0 ok, 1 not found / infected, 2 usage / unscannable,
69 upstream refused, 75 temporary failure, 78 configuration.
"""

import enum
import sys

import click


class ExitCode(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    INFECTED = 1
    USAGE = 2
    UNSCANNABLE = 2
    UNAVAILABLE = 69
    TEMPFAIL = 75
    CONFIG = 78


config_option = click.option(
    "-c", "--config", "config_path", metavar="FILE", default=None,
    help="Configuration file (default: $VIRUSGW_CONF, else /etc/virusgw.conf).")


def load_config(config_path):
    """The validated config, or exit 78 with every problem on stderr."""
    from scanlib import config
    try:
        return config.load(config_path, cache=False)
    except config.ConfigError as e:
        for p in e.problems:
            click.echo("virusgw: %s" % p, err=True)
        sys.exit(ExitCode.CONFIG)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="virusgw", prog_name="virusgw")
def main():
    """Administer the virusgw scanning gateway."""


@main.command("check-config")
@config_option
def check_config(config_path):
    """Validate the configuration; print every problem (exit 78) or 'ok'."""
    conf = load_config(config_path)
    problems = host_problems(conf)
    for p in problems:
        click.echo("virusgw: %s" % p, err=True)
    if problems:
        sys.exit(ExitCode.CONFIG)
    click.echo("%s: ok" % conf.path)


def host_problems(conf):
    """What the file cannot say by itself: the accounts it names exist on
    this host (the proxies would answer 421 to every client otherwise)."""
    import grp
    import pwd
    out = []
    user = conf.get("user", "")
    if user:
        try:
            pwd.getpwnam(user)
        except KeyError:
            out.append("%s: top level, key 'user': no such user %r on this host" % (conf.path, user))
    group = conf["quarantine"].get("group", "")
    if group:
        try:
            grp.getgrnam(group)
        except KeyError:
            out.append("%s: section [quarantine], key 'group': no such group %r on this host"
                       % (conf.path, group))
    return out


def _register():
    """Commands that live in their own modules."""
    for modname, attr in (("scanlib.scancli", "scan"), ("scanlib.qcli", "quarantine"),
                          ("scanlib.setupcli", "setup")):
        try:
            mod = __import__(modname, fromlist=[attr])
        except ImportError as e:
            if e.name != modname:
                raise
            continue
        main.add_command(getattr(mod, attr))


_register()
