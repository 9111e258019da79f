"""The ``dyncnn`` command: one module per subcommand, each with ``add_parser(sub)`` (its arguments) beside
``run(args)`` (its body); helpers they share are in :mod:`dyncnn.cli.common`."""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from .. import __version__
from ..errors import DyncnnError
from . import bench, calibrate, demo, eval, export, frontier, profile, train, zoo
from .common import THREADS, _HelpFormatter
from .zoo import zoo_cache_dir

__all__ = ["COMMANDS", "THREADS", "TIMING_COMMANDS", "build_parser", "main", "zoo_cache_dir"]

# The subcommands, in the order `dyncnn --help` lists them.
COMMANDS = (zoo, profile, train, eval, calibrate, frontier, demo, export, bench)


class _Parser(argparse.ArgumentParser):
    """The top-level parser: a mistyped command or option is refused with a suggestion (difflib), an option by its
    command's parser (that command's usage), not by the top level's "unrecognized arguments"."""

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None:   # the subcommands' parsers are of this class too: check once, at the top
            self._check_spelling(sys.argv[1:] if args is None else list(args))
        return super().parse_known_args(args, namespace)

    def _check_spelling(self, argv: list[str]) -> None:
        commands = self._subparsers._group_actions[0].choices
        i = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
        if i is None:
            return
        if argv[i] not in commands:
            self.error(f"unknown command {argv[i]!r}{_did_you_mean(argv[i], commands)} (commands: "
                       f"{', '.join(commands)})")
        sub = commands[argv[i]]
        for a in argv[i + 1:]:
            if a == "--":
                break
            name = a.split("=", 1)[0]
            if not a.startswith("-") or a == "-" or sub._negative_number_matcher.match(a) or \
                    any(o.startswith(name) for o in sub._option_string_actions):
                continue
            sub.error(f"unrecognized argument {a}{_did_you_mean(name, sub._option_string_actions)}")


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dyncnn", description="Efficient mobile CNNs and dynamic networks that execute the computation "
                "they save: build, train, profile, evaluate.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    for sp in sub.choices.values():
        sp.formatter_class = _HelpFormatter
    return p


# Commands that time models: their process keeps freed activations for reuse (profile.latency.retain_freed_memory)
TIMING_COMMANDS = ("profile", "bench", "frontier", "demo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in TIMING_COMMANDS:
        from ..profile.latency import retain_freed_memory
        retain_freed_memory()
    try:
        code = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, inside the handlers below, not at exit
        return code
    except (DyncnnError, FileNotFoundError, ValueError) as e:
        print(f"dyncnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dyncnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`dyncnn ... | head -1`): stop quietly, as `yes | head -1` does; stdout now points
        # at /dev/null so that the interpreter's last flush does not fail again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 141
    except OSError as e:          # permission denied, disk full, read-only file system: say which file
        where = f" {e.filename}" if e.filename else ""
        print(f"dyncnn {args.command}: error: cannot access{where}: {e.strerror or e}", file=sys.stderr)
        return 2

