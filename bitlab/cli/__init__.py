"""The `bitlab` command. Each subsystem module adds its subcommands with `register(subparsers)`;
every handler parses, calls one library function and prints."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from bitlab import __version__
from bitlab.errors import BitlabError, ConfigError
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
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Give every (sub-)subcommand its full name as `args.prog` ("bitlab weights download") and its
    flags by setting as `args.setting_flags` ({"base_lr": "--base-lr"}), for error messages: the
    innermost parser's defaults win when argparse merges the namespaces."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(prog=sub.prog, setting_flags={a.dest: a.option_strings[0] for a in sub._actions
                                                                if a.option_strings})
                _name_commands(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: recorded by make-ooc
    # Under torchrun all ranks share one terminal: rank 0 tells the story (INFO); the others show
    # only warnings and errors, naming their rank (all of them log everything with --verbose).
    rank = env_rank()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s " + (f"rank {rank} " if rank else "") + "%(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.verbose:  # the HTTP client under huggingface_hub logs every request (timm's weights) at INFO
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return code
    except ConfigError as e:  # a library error names the setting; here it is the flag that set it
        print(f"{args.prog}: error: {e.worded(args.setting_flags.get(e.setting, e.setting))}", file=sys.stderr)
        return 2
    except BitlabError as e:
        print(f"{args.prog}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (`bitlab models --json | head`): stop quietly, as other unix tools do.
        # Python would flush stdout again at exit and fail once more, so point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        # An output (or input) path that cannot be made or read: the user's to fix, not a bug.
        print(f"{args.prog}: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130


def download_size_arg(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """`--max-download SIZE` for every command that downloads (`bitlab.fileio.download`'s cap)."""
    from bitlab.fileio import parse_size

    def size(text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    shown = next(f"{default >> s}{u}" for s, u in ((40, "T"), (30, "G"), (20, "M"), (10, "K"), (0, ""))
                 if default % (1 << s) == 0)
    p.add_argument("--max-download", type=size, default=default, metavar="SIZE",
                   help=f"largest {what} to download, e.g. 500M or 8G (default {shown}); a server announcing "
                        "or sending more is refused")
