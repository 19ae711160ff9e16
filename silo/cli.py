"""The ``silo`` command line.

Subcommands are registered in ``COMMANDS``; each has a function adding its arguments to its
subparser and a handler returning the process exit code. ``silo serve`` gets one flag per
entry in ``silo.config.OPTIONS``.
"""

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from silo import __version__, cli_client, cli_ops
from silo.config import OPTIONS, ConfigError, load_config

EXIT_BAD_CONFIG = 2


class Command(NamedTuple):
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _configure_serve(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=None,
        help="TOML config file (see CONFIGURATION.md)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        group = groups.get(opt.section)
        if group is None:
            group = groups[opt.section] = parser.add_argument_group(f"[{opt.section}] options")
        default = opt.default_doc or opt.default_toml()
        help_text = f"{opt.help} (env {opt.env}; default {default})".replace("%", "%%")
        if opt.is_bool:
            group.add_argument(
                opt.flag,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                opt.flag,
                dest=opt.name,
                metavar=opt.metavar or "VALUE",
                default=argparse.SUPPRESS,
                help=help_text,
            )


def _run_serve(args: argparse.Namespace) -> int:
    overrides = {opt.name: getattr(args, opt.name) for opt in OPTIONS if hasattr(args, opt.name)}
    try:
        config = load_config(overrides, os.environ, args.config)
    except ConfigError as e:
        print(f"silo: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    from silo.runtime.server import run_server

    return run_server(config)


COMMANDS: dict[str, Command] = {
    "serve": Command("run the Silo server", _configure_serve, _run_serve),
    # Client-side commands (worker, enqueue, job, tenant, cluster, query, profile).
    **{name: Command(*spec) for name, spec in cli_client.COMMANDS.items()},
    **{name: Command(*spec) for name, spec in cli_ops.COMMANDS.items()},  # operator commands
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="silo",
        description="Silo: a durable background job queue server.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"silo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        command.configure(
            sub.add_parser(name, help=command.help, description=command.help, allow_abbrev=False)
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for the ``silo`` console script; returns the process exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return COMMANDS[args.command].run(args)
