"""Nothing is written half: outputs go to a temporary sibling and are renamed when complete.
An existing output is replaced only with an explicit ``overwrite``."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from sparsemerge.errors import SparsemergeError


def check_not_an_input(out: "str | Path", inputs: Iterable[Any]) -> None:
    """Refuse an output that is, or contains, one of ``inputs`` (paths; other values, e.g. a
    bundled model's name, are ignored): replacing it would delete the input."""
    out_resolved = Path(out).resolve()
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            continue
        path = Path(item)
        if not path.exists():
            continue
        resolved = path.resolve()
        if resolved == out_resolved or out_resolved in resolved.parents:
            relation = "is" if resolved == out_resolved else "contains"
            raise SparsemergeError(
                f"output {str(out)!r} {relation} the input {str(item)!r}; writing it would destroy the input - "
                "choose an output path outside the inputs"
            )


def ensure_writable(out: "str | Path", overwrite: bool, inputs: Optional[Iterable[Any]] = None) -> Path:
    """Fail early (before any work) when ``out`` exists and ``overwrite`` is not set, or when
    ``out`` is or contains one of ``inputs``."""
    out = Path(out)
    if inputs is not None:
        check_not_an_input(out, inputs)
    if out.exists() and not overwrite:
        raise SparsemergeError(
            f"output {str(out)!r} already exists; choose another path or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    if not out.parent.exists():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SparsemergeError(f"cannot create the output's folder {str(out.parent)!r}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):  # fail before the work, not after it
        raise SparsemergeError(f"cannot write into {str(out.parent)!r} (permission denied); choose a writable output location")
    return out


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which races with threads creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: "str | Path", is_dir: Optional[bool] = None) -> None:
    """Give ``path`` (made by ``tempfile``, which uses 0700 / 0600) the mode ``mkdir`` or
    ``open`` would have given it: 0777 / 0666 minus the umask."""
    path = Path(path)
    if is_dir is None:
        is_dir = path.is_dir()
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_output(out: "str | Path", overwrite: bool = False, is_dir: bool = True,
                  inputs: Optional[Iterable[Any]] = None) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on success move it to ``out``.

    On any exception the temporary is removed and ``out`` (if it existed) is untouched.
    ``inputs``: paths the output must not be or contain (checked before anything is written).
    """
    inputs = list(inputs) if inputs is not None else None
    out = ensure_writable(out, overwrite, inputs)
    prefix = f".{out.name}.tmp-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        follow_umask(tmp, is_dir)  # the output gets the usual mode, not tempfile's private one
        yield tmp
        if inputs:  # a symlink or rename while we worked must not turn the output into an input
            check_not_an_input(out, inputs)
        _replace(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:  # appeared while we worked
            raise SparsemergeError(f"output {str(out)!r} appeared while writing; not replacing it")
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
        os.replace(tmp, out)
        _remove(backup)
    else:
        os.replace(tmp, out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_json_atomic(path: "str | Path", data: Any, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON through a temporary file."""
    with atomic_output(path, overwrite=overwrite, is_dir=False) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return Path(path)
