"""`virusgw scan`: scan files with the configured clamd, as the proxies do.

One line per file, as clamd writes them ("FILE: OK", "FILE: NAME FOUND",
"FILE: size-limit (why) ERROR"), or --json.  Exit status (see ExitCode):
0 every file clean, 1 something infected, 2 something unscannable and
nothing infected, 78 configuration problem.
"""

import sys

import click

from scanlib.cli import ExitCode, config_option, load_config


@click.command("scan")
@config_option
@click.option("--method", type=click.Choice(["auto", "fildes", "stream", "path"]), default=None,
              help="How clamd gets the file (default: [scanner] method).")
@click.option("--clamd", "endpoints", multiple=True, metavar="ENDPOINT",
              help="unix:PATH, tcp:HOST:PORT or tcp:[V6]:PORT instead of [scanner] clamd "
                   "(repeat for failover).")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds for one scan (default: [scanner] timeout).")
@click.option("--json", "as_json", is_flag=True, help="One JSON array of results.")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=True))
def scan(config_path, method, endpoints, timeout, as_json, files):
    """Scan FILE... with clamd; print one result line per file."""
    from scanlib.scanner import Scanner, verdict_line
    from scanlib.verdict import Infected, Unscannable
    section = dict(load_config(config_path)["scanner"])
    if endpoints:
        section["clamd"] = list(endpoints)
    if method:
        section["method"] = method
    if timeout:
        section["timeout"] = timeout
    try:
        scanner = Scanner.from_config(section)
    except ValueError as e:
        click.echo("virusgw: %s" % e, err=True)
        sys.exit(ExitCode.USAGE)
    verdicts = scanner.scan_many(files)
    if as_json:
        import json
        out = []
        for f, v in zip(files, verdicts):
            rec = {"file": f, "verdict": v.kind}
            if isinstance(v, Infected):
                rec["viruses"] = list(v.names)
            if isinstance(v, Unscannable):
                rec["reason"] = v.reason
                rec["detail"] = v.detail
            out.append(rec)
        click.echo(json.dumps(out, indent=1))
    else:
        for f, v in zip(files, verdicts):
            click.echo(verdict_line(f, v, detail=True, internal=True))
    if any(isinstance(v, Infected) for v in verdicts):
        sys.exit(ExitCode.INFECTED)
    if any(isinstance(v, Unscannable) for v in verdicts):
        sys.exit(ExitCode.UNSCANNABLE)
    sys.exit(ExitCode.OK)
