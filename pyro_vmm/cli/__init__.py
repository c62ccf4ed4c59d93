"""The ``pyro-vmm`` command line: one entry point, one subcommand per job.

    pyro-vmm scrna  --data FILE.h5ad --batch-key batch --labels-key cell_type --prior vmm --out runs/kang
    pyro-vmm map    --reference runs/kang --data QUERY.h5ad --labels-key cell_type --out runs/query
    pyro-vmm images --dataset digits --prior vmm --out runs/digits
    pyro-vmm images-sweep ...

Each subcommand lives in its own module exposing ``add_parser(subparsers)``; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an option's help only where it says something: not on required options, flags,
    options whose default is ``None`` (their help says what happens), or help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                or "(default" in text or "default:" in text):
            return text
        return super()._get_help_string(action)


def add_command(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str, outputs: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``: ``help`` is its line in ``pyro-vmm --help``; its own help shows
    ``description`` and the ``outputs`` it writes into ``--out``."""
    if outputs:
        description = f"{description} Writes into --out: {', '.join(outputs)}."
    return subparsers.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)


def add_io_args(p: argparse.ArgumentParser, data_help: str, layer_help: str) -> argparse._ArgumentGroup:
    """The "data and output" group with ``--data``, ``--out`` and ``--layer``; returns it for further options."""
    io = p.add_argument_group("data and output")
    io.add_argument("--data", required=True, metavar="FILE.h5ad", help=data_help)
    io.add_argument("--out", required=True, metavar="DIR", help="output folder (created if needed)")
    io.add_argument("--layer", default=None, help=layer_help)
    return io


#: subcommand modules (each defines ``add_parser(subparsers) -> None`` that sets ``func``)
SUBCOMMANDS = ("pyro_vmm.cli.scrna", "pyro_vmm.cli.mapping", "pyro_vmm.cli.images")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-vmm",
        description="The VampPrior Mixture Model: integrate and cluster single-cell data, or cluster images.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = import_module(name)
        except ModuleNotFoundError as err:  # a subcommand module not written yet
            if err.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:  # bad input: one clear line, no traceback
        print(f"pyro-vmm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
