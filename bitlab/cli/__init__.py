"""The `bitlab` command. Each subsystem module adds its subcommands with `register(subparsers)`;
every handler parses, calls one library function and prints."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bitlab import __version__
from bitlab.errors import BitlabError
from bitlab.train.torchrun import env_rank

# One module per subsystem; the order is the order of `bitlab --help`.
COMMAND_MODULES = ("bitlab.cli.models", "bitlab.cli.train", "bitlab.cli.pretrain", "bitlab.cli.ooc",
                   "bitlab.cli.eval", "bitlab.cli.dedup", "bitlab.cli.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitlab", description="Big Transfer (BiT): models, transfer, "
                                     "pre-training and the out-of-context robustness study.")
    parser.add_argument("--version", action="version", version=f"bitlab {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: recorded by make-ooc
    # Under torchrun all ranks share one terminal: rank 0 tells the story (INFO); the others show
    # only warnings and errors, naming their rank (all of them log everything with --verbose).
    rank = env_rank()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s " + (f"rank {rank} " if rank else "") + "%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except BitlabError as e:
        print(f"bitlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitlab {args.command}: interrupted", file=sys.stderr)
        return 130
