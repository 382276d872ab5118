"""Resolve mergekit-style parameter settings for one tensor, as mergekit does.

Precedence (highest first): the slice source's / model entry's ``parameters``, the output
slice's ``parameters``, the config's global ``parameters``, the method's default.

A setting resolves for tensor ``name`` at layer position ``t`` in [0, 1]:

* scalar -> itself;
* list of numbers (a gradient) -> piecewise-linear interpolation: with ``n`` anchors,
  ``s = t (n-1)``, ``i = floor(s)``, value ``(1 - (s-i)) v_i + (s-i) v_{i+1}``;
  a list of non-numbers picks ``v_{floor(t (n-1))}``;
* ``{filter: F, value: V}`` or a list of them -> the first whose ``F`` is ``*``, absent or a
  substring of ``name``, resolved recursively; none matching -> the next scope.

``t`` is ``i / (L-1)`` for layer ``i`` of a slice of ``L`` layers (1 for one-layer slices), and 0
for tensors outside the layers (embeddings, final norm, LM head), as in mergekit 0.1.x.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import REQUIRED, MethodSpec

_MISSING = object()


def _coerce(name: str, value: Any, default: Any) -> Any:
    if value is None:
        return None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, (int, float)):
            return bool(value)
        raise SparsemergeError(f"parameter {name!r} must be true or false, got {value!r}")
    if isinstance(default, str):
        return str(value)
    if default is None and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise SparsemergeError(f"parameter {name!r} must be a number, got {value!r}")


def evaluate_setting(name: str, setting: Any, tensor_name: str, t: float, default: Any = None) -> Any:
    """Resolve one setting (see the module docstring); ``_MISSING`` when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _coerce(name, setting, default)
    if setting is None:
        return _MISSING
    if isinstance(setting, list):
        if not setting:
            return _MISSING
        if all(not isinstance(e, dict) for e in setting):
            values = [_coerce(name, e, default) for e in setting]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numeric:
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * values[i0] + frac * values[i1]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(name, cond["value"], tensor_name, t, default)
        return _MISSING
    raise SparsemergeError(f"parameter {name!r}: unsupported setting {setting!r}")


def resolve(
    name: str,
    default: Any,
    scopes: Iterable[Optional[dict[str, Any]]],
    tensor_name: str,
    t: float,
    where: str,
) -> Any:
    """The first scope that sets ``name`` (and matches the tensor) wins; else the default."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(name, scope[name], tensor_name, t, None if default is REQUIRED else default)
            if value is not _MISSING and value is not None:
                return value
    if default is REQUIRED:
        raise SparsemergeError(
            f"missing required parameter {name!r} for {where}; set it under the model's parameters or the global parameters"
        )
    return default


def resolve_globals(spec: MethodSpec, scopes: list[Optional[dict[str, Any]]], tensor_name: str, t: float) -> dict[str, Any]:
    return {k: resolve(k, d, scopes, tensor_name, t, tensor_name) for k, d in spec.global_params.items()}


def resolve_model_params(
    spec: MethodSpec, scopes: list[Optional[dict[str, Any]]], tensor_name: str, t: float, model: str
) -> dict[str, Any]:
    return {k: resolve(k, d, scopes, tensor_name, t, f"{model}:{tensor_name}") for k, d in spec.model_params.items()}


def unknown_parameters(spec: MethodSpec, settings: Iterable[Optional[dict[str, Any]]]) -> list[str]:
    """Parameter names set in the config that the method does not take (reported as an error)."""
    known = set(spec.global_params) | set(spec.model_params)
    found: list[str] = []
    for scope in settings:
        for key in scope or {}:
            if key not in known and key not in found:
                found.append(key)
    return found


# Parameters that take a number (besides those whose default is a number or REQUIRED), and the
# ranges the methods need: outside them a method would clamp silently or compute NaN.
_NUMERIC = {"weight", "density", "gamma", "epsilon", "lambda", "t", "scale"}
_RANGES: dict[str, tuple[float, float, str]] = {
    "density": (0.0, 1.0, "in (0, 1]: the fraction of each task vector kept"),
    "gamma": (0.0, 1.0, "in [0, 1): the fraction of largest entries dropped"),
    "epsilon": (0.0, 1.0, "in [0, 1): DELLA's spread of keep probabilities"),
}


def _leaves(setting: Any) -> Iterable[Any]:
    if isinstance(setting, dict):
        yield from _leaves(setting.get("value"))
    elif isinstance(setting, list):
        for item in setting:
            yield from _leaves(item)
    elif setting is not None:
        yield setting


def check_values(spec: MethodSpec, scopes: Iterable[Optional[dict[str, Any]]]) -> None:
    """Before any tensor is read: every numeric parameter is a finite number in its range
    (a weight of NaN or a density of 0, -1, 2 or inf otherwise gives a NaN model or a silent clamp)."""
    import math

    defaults = {**spec.global_params, **spec.model_params}
    for scope in scopes:
        for name, setting in (scope or {}).items():
            default = defaults.get(name)
            numeric = name in _NUMERIC or default is REQUIRED or (
                isinstance(default, (int, float)) and not isinstance(default, bool))
            if not numeric:
                continue
            for leaf in _leaves(setting):
                try:
                    value = float(leaf) if not isinstance(leaf, bool) else None
                except (TypeError, ValueError):
                    value = None
                if value is None:
                    raise SparsemergeError(f"parameter {name!r} must be a number, got {leaf!r}")
                if not math.isfinite(value):
                    raise SparsemergeError(f"parameter {name!r} must be a finite number, got {leaf!r}")
                if name in _RANGES:
                    low, high, what = _RANGES[name]
                    ok = (low < value <= high) if name == "density" else (low <= value < high)
                    if not ok:
                        raise SparsemergeError(f"parameter {name!r} must be {what}; got {leaf!r}")
