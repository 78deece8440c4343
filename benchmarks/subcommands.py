"""The command line every benchmark script shares: one subcommand per measurement, its help its docstring."""

from __future__ import annotations

import argparse
import inspect


def run_subcommand(description: str, commands: dict, argv=None):
    """Parse `argv` against `commands` (name -> (function(args, parser), add_arguments(parser), one-line help))
    and run the chosen function."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {}
    for name, (run, add_arguments, summary) in commands.items():
        parsers[name] = subparsers.add_parser(name, help=summary, description=inspect.cleandoc(run.__doc__),
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parsers[name])
    args = parser.parse_args(argv)
    name = vars(args).pop("command")
    return commands[name][0](args, parsers[name])
