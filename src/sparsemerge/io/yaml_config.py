"""The one reader of YAML configs (merge, MoE, training recipes): a file or a mapping in, a
validated pydantic model out, and every failure - unreadable file, invalid YAML, not a mapping,
a field out of range - a :class:`SparsemergeError` that names the file and the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from sparsemerge.errors import SparsemergeError

T = TypeVar("T")


def load_yaml_config(source: "str | Path | dict[str, Any]", model: "type[T]", what: str, expected: str) -> T:
    """``model(**data)`` of the YAML file ``source`` (or the mapping itself). ``what`` names the
    config in messages ("merge config"); ``expected`` says what its top level must hold."""
    import yaml
    from pydantic import ValidationError

    if isinstance(source, dict):
        data: Any = source
        where = "config"
    else:
        path = Path(source)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise SparsemergeError(f"could not read {what} {where!r}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise SparsemergeError(f"{what} {where!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SparsemergeError(f"{what} {where!r} must be a mapping with {expected}")
    try:
        return model(**data)
    except ValidationError as exc:
        inner = [e for e in exc.errors() if isinstance(e.get("ctx", {}).get("error"), SparsemergeError)]
        if inner:
            raise SparsemergeError(f"{what} {where!r}: {inner[0]['ctx']['error']}") from None
        details = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SparsemergeError(f"invalid {what} {where!r}: {details}") from None
