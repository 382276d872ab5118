"""The fuzz harness shared by ``tests/io/test_io_fuzz*.py`` and ``benchmarks/fuzz_readers.py``.

A *reader* is one of the project's parsers of untrusted files (safetensors header, shard
index, packed manifest, GGUF, YAML recipes): ``setup(folder)`` writes valid seed inputs once,
``strategy`` draws a mutation of them, ``read(ctx, example)`` writes the mutated input and
calls the project's entry points. :func:`run_example` holds every example to the contract of
issue 17: the call succeeds or raises :class:`SparsemergeError`; any other exception, a run
past :data:`TIME_LIMIT_S`, or an allocation past :data:`MEMORY_HEADROOM` (the address space
is capped while the example runs, so a "shape [10**6, 10**6]" fails fast instead of taking
the machine down) fails the example.
"""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError

TIME_LIMIT_S = 10.0  # per example; the slowest reader (GGUF through transformers) takes ~0.3 s
MEMORY_HEADROOM = 3 << 30  # bytes of address space an example may add to the process


class Hang(BaseException):
    """Raised by the alarm of :func:`bounded`; a BaseException so the project's ``except
    Exception`` (which turns library errors into SparsemergeError) cannot swallow it."""


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Interrupt the block with :class:`Hang` after ``seconds`` (SIGALRM; main thread only,
    elsewhere only the elapsed time is checked by :func:`run_example`)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # again, in case this one lands in a gc callback that ignores it
        raise Hang(f"no result after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> "int | None":
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Cap the address space at its current size plus ``headroom`` (Linux; no-op elsewhere):
    a huge allocation raises MemoryError / torch's "can't allocate memory" inside the block."""
    try:
        import resource
    except ImportError:
        yield
        return
    used = _address_space()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if used is None:
        yield
        return
    cap = used + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]


def allocation_failure(exc: BaseException) -> "BaseException | None":
    """The MemoryError (or torch allocator error) behind ``exc``, if any: a reader that tried
    to allocate what the file only claims has a bug even when it reports it politely."""
    for e in _chain(exc):
        if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "can't allocate memory" in str(e)):
            return e
    return None


@dataclass(frozen=True)
class KnownCrash:
    """A crash the fuzzers found in a module this change could not edit (another change owns
    it). The properties tolerate it so they keep guarding everything else; each one has an
    ``xfail(strict=True)`` regression test in ``test_io_fuzz_regressions.py``, which starts
    passing - and so fails, being strict - once the module is fixed: then delete both."""

    module: str  # path below src/, e.g. "sparsemerge/formats/reader.py"
    function: str  # a project function on the traceback
    exc_type: type
    what: str


KNOWN_UNFIXED: list[KnownCrash] = []  # none open: the last six (formats/reader.py, ct.py) were fixed


def known_crash(exc: BaseException) -> "KnownCrash | None":
    """The :data:`KNOWN_UNFIXED` entry ``exc`` matches (its type, and the function on its
    traceback), if any."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    project = [(c.co_filename.replace("\\", "/"), c.co_name) for c in frames if "/src/sparsemerge/" in c.co_filename.replace("\\", "/")]
    for known in KNOWN_UNFIXED:
        if type(exc) is known.exc_type and any(f.endswith("/src/" + known.module) and fn == known.function for f, fn in project):
            return known
    return None


_outcomes: list[str] = []  # what the entry points of the running example did
_messages: list[str] = []  # the SparsemergeError messages they raised


def last_messages() -> list[str]:
    """The SparsemergeError messages of the last example (for the long run's summary)."""
    return list(_messages)


def tolerate(fn: Callable[[], Any]) -> Any:
    """``fn()``, or None when it raises SparsemergeError (the accepted outcome for bad input)
    or a :data:`KNOWN_UNFIXED` crash; any other exception propagates. Lets one example try
    several entry points in turn."""
    try:
        result = fn()
    except SparsemergeError as exc:
        if allocation_failure(exc) is not None:
            raise AssertionError(f"huge allocation behind a SparsemergeError: {exc}") from exc
        _outcomes.append("error")
        _messages.append(str(exc))
        return None
    except Exception as exc:
        known = known_crash(exc)
        if known is None:
            raise
        _outcomes.append(f"known crash in {known.module}:{known.function} ({known.exc_type.__name__})")
        return None
    _outcomes.append("ok")
    return result


def note(text: str) -> None:
    """hypothesis.note inside a property (printed with a failing example); no-op elsewhere."""
    from hypothesis import note as hypothesis_note
    from hypothesis.errors import InvalidArgument

    try:
        hypothesis_note(text)
    except InvalidArgument:
        pass


@dataclass
class Reader:
    """One fuzzed reader: ``setup(folder) -> ctx`` writes the seeds, ``strategy`` draws an
    example, ``read(ctx, example)`` runs the project's entry points on it."""

    name: str
    setup: Callable[[Path], Any]
    strategy: st.SearchStrategy
    read: Callable[[Any, Any], None]
    doc: str = ""


def guarded(fn: Callable[[], Any], limit: float = TIME_LIMIT_S, what: str = "the call") -> Any:
    """``fn()`` under the time bound and the memory cap: a hang or an overlong run is an
    AssertionError, a huge allocation fails inside ``fn``; other exceptions propagate."""
    start = time.monotonic()
    try:
        with memory_cap(), bounded(limit):
            result = fn()
    except Hang as exc:
        raise AssertionError(f"{what}: hang - {exc}") from None
    elapsed = time.monotonic() - start
    if elapsed > limit:
        raise AssertionError(f"{what}: took {elapsed:.1f} s (limit {limit:.0f} s)")
    return result


def run_example(reader: Reader, ctx: Any, example: Any, limit: float = TIME_LIMIT_S) -> str:
    """Run one example :func:`guarded`. Returns its outcome: "ok" (every entry point
    succeeded), "error" (some raised our error type) or "known crash ..."; any other exception
    propagates (the test fails and hypothesis shrinks it)."""
    del _outcomes[:], _messages[:]
    guarded(lambda: tolerate(lambda: reader.read(ctx, example)), limit, f"{reader.name}: one example")
    known = [o for o in _outcomes if o.startswith("known")]
    return known[0] if known else ("error" if "error" in _outcomes else "ok")


# ---------------------------------------------------------------------------------------------
# values and mutations shared by the readers

SPECIAL_INTS = [0, 1, -1, 2, 3, 4, 8, 16, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
                2**64, -(2**63), 10**12, 10**18, 10**30]
SPECIAL_FLOATS = [math.nan, math.inf, -math.inf, 0.5, -0.0, 1e308, 1e-320]
SPECIAL_STRS = ["", "0", "3", "-1", "1e999", "nan", "x", ".", "..", "../x", "/etc/passwd", "a\x00b", "\ud800", "é" * 3,
                " ", "float32", "bfloat16", "int4", "int8", "uint8", "nm", "bitmask", "coo", "csr", "bsr", "dense",
                "2:4", "4:8", "0:4", "index", "entropy", "bits2", "F32", "I64", "BOOL", "model.norm.weight"]
SPECIAL_LISTS = [[], [0], [-1, 4], [4, 16], [10**12, 10**12], [2**63, 1], [0, 2**70], ["4", "16"], [1.5], [[4]], [None],
                 [1, 2, 3, 4, 5, 6, 7, 8, 9]]


def nasty(extra: "list[Any] | None" = None) -> st.SearchStrategy:
    """JSON-like values that break type and range assumptions (NaN included), plus ``extra``
    reader-specific values (valid dtype codes, shard names, ...)."""
    leaves = st.one_of(
        st.none(), st.booleans(), st.sampled_from(SPECIAL_INTS), st.integers(-(2**70), 2**70),
        st.sampled_from(SPECIAL_FLOATS), st.floats(), st.sampled_from(SPECIAL_STRS), st.text(max_size=6),
        st.sampled_from(SPECIAL_LISTS), st.just({}), *( [st.sampled_from(extra)] if extra else [] ),
    )
    return st.one_of(leaves, st.lists(leaves, max_size=4), st.dictionaries(st.sampled_from(["key", "shape", "dtype", "x"]), leaves, max_size=3))


Path_ = tuple  # a path into a JSON tree: keys and indices


def tree_paths(tree: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every node's path, root first."""
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += tree_paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += tree_paths(v, prefix + (i,))
    return out


def _get(tree: Any, path: Path_) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: Any, path: Path_, value: Any) -> Any:
    if not path:
        return value
    _get(tree, path[:-1])[path[-1]] = value
    return tree


def tree_edits(values: st.SearchStrategy, keys: "list[str] | None" = None, max_ops: int = 3) -> st.SearchStrategy:
    """1..``max_ops`` structural edits of a JSON tree, as data (applied by :func:`apply_tree_edits`
    to a seed the strategy need not know): a node replaced by a nasty value, deleted, copied over
    another node (a plausible value in the wrong place), wrapped in a list, or a key added.
    Nodes are picked by index into the seed's node list, so edits shrink toward the root."""
    keys = keys or ["x"]
    edit = st.tuples(
        st.sampled_from(["replace", "replace", "delete", "copy", "wrap", "add"]),
        st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.sampled_from(keys) | st.text(max_size=4), values,
    )
    return st.lists(edit, min_size=1, max_size=max_ops)


def apply_tree_edits(seed: Any, edits: list) -> Any:
    """A deep copy of ``seed`` with :func:`tree_edits` applied in order."""
    tree = copy.deepcopy(seed)
    for op, i, j, key, value in edits:
        paths = tree_paths(tree)
        path = paths[i % len(paths)]
        node = _get(tree, path)
        if op == "replace":
            tree = _set(tree, path, copy.deepcopy(value))
        elif op == "delete" and path:
            del _get(tree, path[:-1])[path[-1]]
        elif op == "copy":
            tree = _set(tree, path, copy.deepcopy(_get(tree, paths[j % len(paths)])))
        elif op == "wrap":
            tree = _set(tree, path, [node])
        elif op == "add" and isinstance(node, dict):
            node[key] = copy.deepcopy(value)
    return tree


@st.composite
def mutate_bytes(draw: Any, max_ops: int = 4) -> list[tuple[str, int, bytes]]:
    """Byte-level edits as data (applied by :func:`apply_byte_edits` to a seed whose length the
    strategy does not know): overwrite, insert, delete a span, truncate; positions are taken
    modulo the seed's length, so they shrink toward the start of the file."""
    ops = []
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["overwrite", "insert", "delete", "truncate", "u64"]))
        pos = draw(st.integers(0, 1 << 20))
        if kind == "u64":  # a length or count field overwritten with an extreme value
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1]))
            ops.append(("overwrite", pos, value.to_bytes(8, "little")))
        elif kind in ("overwrite", "insert"):
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=8))))
        else:
            ops.append((kind, pos, b"" if kind == "truncate" else bytes(draw(st.integers(1, 64)))))
    return ops


def apply_byte_edits(data: bytes, ops: list[tuple[str, int, bytes]], aligned_to: "list[int] | None" = None) -> bytes:
    """Apply :func:`mutate_bytes` edits; ``aligned_to``: positions of interest (length fields)
    that a position picks from when it is odd, so counts are hit more often than by chance."""
    buf = bytearray(data)
    for kind, pos, payload in ops:
        if not buf:
            break
        if aligned_to and pos % 2:
            pos = aligned_to[(pos // 2) % len(aligned_to)]
        pos %= len(buf)
        if kind == "overwrite":
            buf[pos : pos + len(payload)] = payload
        elif kind == "insert":
            buf[pos:pos] = payload
        elif kind == "delete":
            del buf[pos : pos + len(payload)]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)
