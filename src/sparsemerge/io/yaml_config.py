"""The one reader of YAML configs (merge, MoE, training recipes): a file or a mapping in, a
validated pydantic model out, and every failure - unreadable file, invalid YAML, not a mapping,
a field out of range - a :class:`SparsemergeError` that names the file and the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from sparsemerge.errors import SparsemergeError

T = TypeVar("T")

MAX_YAML_VALUES = 100_000  # a real recipe holds hundreds; aliases can make a short file expand to billions


def read_yaml(path: "str | Path", what: str) -> Any:
    """The parsed YAML of ``path`` (safe loader), or a SparsemergeError naming the file: not
    readable, not UTF-8, not valid YAML - PyYAML's constructors also raise ValueError (a date
    such as 2001-02-30, an int of 5000 digits) and RecursionError (nesting thousands deep) -
    or more than :data:`MAX_YAML_VALUES` values once aliases are expanded (an alias "bomb", or
    an alias that contains itself)."""
    import yaml

    where = str(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise SparsemergeError(f"could not read {what} {where!r}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise SparsemergeError(f"{what} {where!r} is not UTF-8 text ({exc}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SparsemergeError(f"{what} {where!r} is not valid YAML: {exc}") from exc
    except Exception as exc:  # PyYAML's constructors raise what they meet: ValueError, AttributeError, RecursionError
        raise SparsemergeError(f"{what} {where!r} is not valid YAML ({type(exc).__name__}: {exc})") from None
    _check_expanded_size(data, f"{what} {where!r}")
    return data


def _check_expanded_size(data: Any, where: str) -> None:
    """Count the values ``data`` holds with aliases expanded, up to the limit (iterative, so a
    self-referencing alias ends at the limit too)."""
    count, todo = 0, [data]
    while todo:
        node = todo.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise SparsemergeError(
                f"{where} expands to more than {MAX_YAML_VALUES:,} values (aliases repeated many times, or an alias "
                "that contains itself); write the values out"
            )
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            todo.extend(node)


def load_yaml_config(source: "str | Path | dict[str, Any]", model: "type[T]", what: str, expected: str) -> T:
    """``model(**data)`` of the YAML file ``source`` (or the mapping itself). ``what`` names the
    config in messages ("merge config"); ``expected`` says what its top level must hold."""
    from pydantic import ValidationError

    if isinstance(source, dict):
        data: Any = source
        where = "config"
        _check_expanded_size(data, f"{what} {where!r}")
    else:
        where = str(source)
        data = read_yaml(source, what)
    if not isinstance(data, dict):
        raise SparsemergeError(f"{what} {where!r} must be a mapping with {expected}")
    try:
        return model.model_validate(data)  # type: ignore[attr-defined]  (not model(**data): keys may be ints)
    except ValidationError as exc:
        inner = [e for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), SparsemergeError)]
        if inner:
            raise SparsemergeError(f"{what} {where!r}: {inner[0]['ctx']['error']}") from None
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SparsemergeError(f"invalid {what} {where!r}: {details}") from None
    except RecursionError:
        raise SparsemergeError(f"{what} {where!r} is nested too deeply to validate") from None
