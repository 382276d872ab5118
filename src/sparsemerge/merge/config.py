"""Merge configs: mergekit's YAML schema plus sparsemerge's own keys, as pydantic models.

mergekit keys (same meaning as in mergekit): ``merge_method``, ``base_model``, ``models``
(``- model: PATH`` with ``parameters``), ``slices`` (``sources: [{model, layer_range,
parameters}]``), ``parameters`` (global), ``dtype`` (working dtype), ``out_dtype``,
``tokenizer_source`` (``base`` or a model; ``union`` is not supported), ``chat_template``.
A parameter value is a scalar, a gradient (list of numbers interpolated over the layers), a
``{filter: SUBSTRING, value: ...}`` mapping, or a list of those (first matching filter wins).

sparsemerge keys: ``seed`` (stochastic methods), ``keep_pattern`` (e.g. ``2:4``: project the
merged weights onto the pattern), ``keep_mask`` (``merged`` or ``base``), ``lora_rank`` (write
the merge as a LoRA adapter of that rank), ``shard_size`` (bytes or ``"2GB"``); for passthrough
stitching, a slice's ``adapter`` (``true`` or ``{ridge, steps, lr}``: a linear adapter at the
slice's entry, :mod:`sparsemerge.merge.stitch`) and ``stitch`` (its calibration text:
``{data, nsamples, seqlen, seed, batch_size}``).
A model is a Hugging Face folder, a .safetensors or .gguf file, a bundled name, a PEFT LoRA
adapter folder, or ``BASE+ADAPTER`` (mergekit's LoRA syntax).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import ALIASES as _DTYPE_ALIASES
from sparsemerge.io.dtypes import FLOAT_NAMES as DTYPES
from sparsemerge.merge.stitch import AdapterOptions, StitchCalibration


def _check_setting(name: str, value: Any) -> Any:
    """Validate one parameter setting's shape (scalar, gradient, conditional, list of conditionals)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict):
        extra = set(value) - {"value", "filter"}
        if "value" not in value or extra:
            raise SparsemergeError(
                f"parameter {name!r}: a conditional setting is {{filter: SUBSTRING, value: V}}, got keys {sorted(value)}"
            )
        flt = value.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise SparsemergeError(
                f"parameter {name!r}: filter must be a substring of tensor names (a string such as 'self_attn' or '*'), got {flt!r}"
            )
        _check_setting(name, value["value"])
        return value
    if isinstance(value, list):
        for item in value:
            if isinstance(item, list):
                raise SparsemergeError(f"parameter {name!r}: nested lists are not a valid setting")
            _check_setting(name, item)
        kinds = {isinstance(i, dict) for i in value}
        if len(kinds) > 1:
            raise SparsemergeError(f"parameter {name!r}: do not mix scalars and {{filter, value}} entries in one list")
        return value
    raise SparsemergeError(f"parameter {name!r}: unsupported setting {value!r}")


def _check_parameters(value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SparsemergeError(f"parameters must be a mapping of name: setting, got {value!r}")
    return {str(k): _check_setting(str(k), v) for k, v in value.items()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: Optional[dict[str, Any]] = None

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[dict[str, Any]] = None

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))

    @model_validator(mode="after")
    def _range(self) -> "SliceSource":
        a, b = self.layer_range
        if a < 0 or b <= a:
            raise SparsemergeError(f"layer_range {list(self.layer_range)} of {self.model!r} must be [start, end) with 0 <= start < end")
        return self


class OutputSlice(_Strict):
    sources: list[SliceSource]
    base_model: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    residual_weight: Optional[float] = None
    adapter: Union[bool, AdapterOptions, None] = None  # sparsemerge: stitching adapter at this slice's entry

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))

    @model_validator(mode="after")
    def _lengths(self) -> "OutputSlice":
        if not self.sources:
            raise SparsemergeError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) != 1:
            raise SparsemergeError(
                "all sources of a slice must span the same number of layers, got "
                + ", ".join(f"{s.model}:{list(s.layer_range)}" for s in self.sources)
            )
        if self.residual_weight is not None:
            raise SparsemergeError("slice residual_weight is not supported; remove it")
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


class MergeConfig(_Strict):
    """One merge: mergekit's schema plus sparsemerge keys (see the module docstring)."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[ModelEntry]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[dict[str, Any]] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    # sparsemerge extensions
    seed: int = 0
    keep_pattern: Optional[str] = None
    keep_mask: Literal["merged", "base"] = "merged"
    lora_rank: Optional[int] = Field(default=None, ge=1)
    shard_size: Union[int, str] = "5GB"
    stitch: Optional[StitchCalibration] = None

    _params = field_validator("parameters")(classmethod(lambda cls, v: _check_parameters(v)))

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: Union[int, str]) -> Union[int, str]:
        parse_size(v)  # at load, not after the merge has run
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        key = _DTYPE_ALIASES.get(v.lower(), v.lower())
        if key not in DTYPES:
            raise SparsemergeError(f"dtype {v!r} is not supported; use one of {', '.join(DTYPES)}")
        return key

    @field_validator("merge_method")
    @classmethod
    def _method(cls, v: str) -> str:
        from sparsemerge.merge.base import get_method

        get_method(v)  # unknown names list the known ones
        return v.lower()

    @field_validator("keep_pattern")
    @classmethod
    def _pattern(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            from sparsemerge.patterns import parse_pattern

            parse_pattern(v)
        return v

    @field_validator("tokenizer_source")
    @classmethod
    def _tokenizer(cls, v: Optional[str]) -> Optional[str]:
        if v == "union":
            raise SparsemergeError("tokenizer_source: union (vocabulary merging) is not supported; use base or a model path")
        return v

    @model_validator(mode="after")
    def _inputs(self) -> "MergeConfig":
        if bool(self.models) == bool(self.slices):
            raise SparsemergeError("a merge config needs exactly one of 'models' or 'slices' (mergekit's 'modules' is not supported)")
        adapters = [i for i, sl in enumerate(self.slices or []) if sl.adapter not in (None, False)]
        if adapters and self.merge_method != "passthrough":
            raise SparsemergeError(f"slice adapters (stitching) need merge_method: passthrough, got {self.merge_method!r}")
        if adapters and adapters[0] == 0:
            raise SparsemergeError("the first slice has no seam before it; put 'adapter' on a later slice")
        if adapters and self.lora_rank is not None:
            raise SparsemergeError("slice adapters (stitching) cannot be written as a LoRA (lora_rank)")
        if self.stitch is not None and not adapters:
            raise SparsemergeError("'stitch' (adapter calibration) is given but no slice has 'adapter: true'")
        return self

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    def referenced_models(self) -> list[str]:
        """Every model path the config names, base first, without repeats."""
        names: list[str] = [self.base_model] if self.base_model else []
        for entry in self.models or []:
            names.append(entry.model)
        for sl in self.slices or []:
            if sl.base_model:
                names.append(sl.base_model)
            names.extend(s.model for s in sl.sources)
        return list(dict.fromkeys(names))


def parse_size(value: "int | str") -> int:
    """``5GB``, ``500MB``, ``1e9`` or an int of bytes -> bytes (a positive int)."""
    expected = f"shard_size {value!r}: expected a positive number of bytes or a size like 2GB or 500MB"
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise SparsemergeError(expected)
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(value))
    if not match:
        raise SparsemergeError(expected)
    base = 1024 if match.group(3) else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[match.group(2).lower()]
    try:  # "1..2" is no float, "1e999" is infinite
        size = int(float(match.group(1)) * base**power)
    except (ValueError, OverflowError):
        raise SparsemergeError(expected) from None
    if size <= 0:
        raise SparsemergeError(expected)
    return size


def load_config(source: "str | Path | dict[str, Any]") -> MergeConfig:
    """Read a merge config from a YAML file (mergekit's format or ours) or a mapping."""
    from sparsemerge.io.yaml_config import load_yaml_config

    return load_yaml_config(source, MergeConfig, "merge config", "merge_method and models or slices")
