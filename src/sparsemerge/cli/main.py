"""``sparsemerge`` entry point.

Each command group lives in its own module exposing ``register(subparsers)``; the module
adds its sub-commands and sets ``func`` (called with the parsed arguments, returns an exit
code). To add a command group, append its module name to ``COMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import errno
import gc
import importlib
import logging
import signal
import sys
from typing import Optional, Sequence

from sparsemerge.errors import SparsemergeError

COMMAND_MODULES = [
    "sparsemerge.cli.prune",  # prune, check
    "sparsemerge.cli.eval",  # eval ppl
    "sparsemerge.cli.sensitivity",  # sensitivity, allocate      (mixed N:M)
    "sparsemerge.cli.train",  # recover, train                  (recovery, sparse training)
    "sparsemerge.cli.demo",  # demo
    "sparsemerge.cli.pack",  # pack, unpack, inspect           (storage)
    "sparsemerge.cli.run",  # run, bench                      (execution)
    "sparsemerge.cli.plan",  # plan                            (decode runtime)
    "sparsemerge.cli.merge",  # merge                           (merging)
    "sparsemerge.cli.analysis",  # lmc, align, tv-stats         (merge analysis)
    "sparsemerge.cli.share",  # share                           (cross-layer sharing)
    "sparsemerge.cli.moe",  # moe, moe-route                  (mixture of experts from task models)
    "sparsemerge.cli.tune",  # tune                            (search + Pareto frontier)
    "sparsemerge.cli.store",  # store init|add|list|verify|remove (task store)
    "sparsemerge.cli.serve",  # serve                           (OpenAI-shaped HTTP API)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsemerge",
        description="Structured sparsity and model merging for edge inference.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # a command group not built yet
                continue
            raise
        module.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every ``atomic_output`` removes
    its temporary (``.OUT.tmp-*``) on the way out."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _os_error_message(exc: OSError) -> str:
    """A read-only output, a full disk, a missing or unreadable file: what failed, on which path."""
    where = " -> ".join(repr(str(f)) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or str(exc)
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; choose a location you can write to (or read, for an input)"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space or choose another output location (nothing was left under the output name)"
    return f"{reason}{': ' + where if where else ''}{hint}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    installed, previous = False, None
    try:  # only the main thread may install handlers (main() also runs inside tests' threads)
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        installed = True
    except ValueError:
        pass
    try:
        return int(args.func(args) or 0)
    except SparsemergeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated; no output was written", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if argv is None:  # the process ends next (the console script); not when tests call main(argv)
            # Every output is complete and renamed by now. The interpreter's final garbage
            # collections would walk the millions of objects torch and transformers made
            # (perf: ~1.2 s of gc_collect_main after a `moe` build); frozen, they are skipped and
            # the operating system reclaims the memory.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
