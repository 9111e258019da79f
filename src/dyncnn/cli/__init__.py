"""The ``dyncnn`` command: one module per subcommand, each with ``add_parser(sub)`` (its arguments) beside
``run(args)`` (its body); helpers they share are in :mod:`dyncnn.cli.common`."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import DyncnnError
from . import bench, calibrate, demo, eval, export, frontier, profile, train, zoo
from .common import THREADS, _HelpFormatter
from .zoo import zoo_cache_dir

__all__ = ["COMMANDS", "THREADS", "TIMING_COMMANDS", "build_parser", "main", "zoo_cache_dir"]

# The subcommands, in the order `dyncnn --help` lists them.
COMMANDS = (zoo, profile, train, eval, calibrate, frontier, demo, export, bench)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyncnn", description="Efficient mobile CNNs and dynamic networks that "
                                "execute the computation they save: build, train, profile, evaluate.")
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

