"""Long fuzz run of every reader of untrusted files (the properties of tests/io/test_io_fuzz.py,
with fresh random seeds instead of CI's fixed examples).

    .venv/bin/python benchmarks/fuzz_readers.py --minutes 10
    .venv/bin/python benchmarks/fuzz_readers.py --minutes 30 --reader gguf --reader manifest

Readers: safetensors, index, manifest, gguf, yaml (default: all; the minutes are shared
equally). Each example must succeed or raise SparsemergeError, within the time bound and the
memory cap of tests/io/fuzz_testlib.py. Prints, per reader: examples run, how many read
cleanly / raised our error / hit a known unfixed crash, the most common error messages, and
every failure with its shrunk example (hypothesis prints it). Exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "io"), str(ROOT / "tests")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

import fuzz_testlib  # noqa: E402


def readers() -> dict[str, fuzz_testlib.Reader]:
    from fuzz_readers_files import INDEX, PACKED, SAFETENSORS
    from fuzz_readers_gguf import GGUF
    from fuzz_readers_yaml import YAML

    return {r.name: r for r in (SAFETENSORS, INDEX, PACKED, GGUF, YAML)}


def _message_kind(outcome: str, messages: list[str]) -> list[str]:
    # paths and numbers vary from example to example; the rest names the check that fired
    return [re.sub(r"'[^']*'|\d+", "_", " ".join(m.split()))[:90] for m in messages] if outcome == "error" else [outcome]


def fuzz(reader: fuzz_testlib.Reader, seconds: float, chunk: int, rng: random.Random) -> dict:
    stats: dict = {"examples": 0, "outcomes": collections.Counter(), "messages": collections.Counter(), "failures": []}
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{reader.name}-") as tmp:
        ctx = reader.setup(Path(tmp))
        while time.monotonic() < deadline:

            @settings(max_examples=chunk, deadline=None, database=None, derandomize=False, print_blob=False,
                      phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
            @seed(rng.getrandbits(64))
            @given(example=reader.strategy)
            def prop(example):
                if time.monotonic() > deadline:
                    return  # the time is up: finish this round without running the rest
                outcome = fuzz_testlib.run_example(reader, ctx, example)
                stats["examples"] += 1
                stats["outcomes"][outcome] += 1
                stats["messages"].update(_message_kind(outcome, fuzz_testlib.last_messages()))

            try:
                prop()
            except Exception as exc:  # a failure: hypothesis has shrunk it and printed the example
                stats["failures"].append("".join(traceback.format_exception(exc))[-4000:])
                print(stats["failures"][-1], flush=True)
    return stats


def main(argv: "list[str] | None" = None) -> int:
    known = readers()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="total run time, shared by the readers (default 5)")
    p.add_argument("--reader", action="append", choices=sorted(known), help="fuzz only this reader (repeatable)")
    p.add_argument("--chunk", type=int, default=100, help="examples per hypothesis round (default 100)")
    p.add_argument("--seed", type=int, default=None, help="random seed of the rounds (default: fresh)")
    args = p.parse_args(argv)
    names = args.reader or list(known)
    rng = random.Random(args.seed)
    failed = 0
    for name in names:
        start = time.monotonic()
        stats = fuzz(known[name], args.minutes * 60 / len(names), args.chunk, rng)
        took = time.monotonic() - start
        o = stats["outcomes"]
        print(f"\n== {name} ({known[name].doc}): {stats['examples']} examples in {took:.0f} s - ok {o['ok']}, "
              f"our error {o['error']}, known unfixed {sum(v for k, v in o.items() if k.startswith('known'))}, "
              f"failures {len(stats['failures'])}")
        for kind, n in stats["messages"].most_common(12):
            print(f"   {n:6d}  {kind}")
        failed += len(stats["failures"])
    print(f"\n{'FAILED' if failed else 'passed'}: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
