"""The interface every tensor format and every value codec implements.

A *format* stores a 2-D weight ``(rows, cols)`` as named storage fields (tensors) plus
JSON parameters; a *codec* replaces a format's ``values`` field by a smaller encoding
(quantized integers, codebook indices). Model-level packing writes exactly
``fields()`` and ``params()``; ``from_fields`` rebuilds the object, validating every field
against the parameters, so a checkpoint that disagrees with its manifest is refused with the
tensor named.

Conversions between formats go through a hub: ``convert(obj, "csr")`` is
``CSR.from_coo(obj.to_coo())``; a format that has no direct COO route goes via dense.

This module names no concrete format or codec: it finds them in :data:`FORMATS` and
:data:`CODECS`, which are full whenever it can be imported (importing any
``sparsemerge.formats.*`` module first runs ``sparsemerge/formats/__init__.py``, which imports
every format and codec module), so the formats and codecs import it and never the reverse.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional, Protocol

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import DTYPE_NAMES, dtype_from_name, dtype_name  # noqa: F401  (the one dtype table; re-exported)
from sparsemerge.registry import Registry

# A format (or pack layout) is one module of this package that registers itself; the first
# lookup imports every module here, so no list needs extending.
FORMATS: "Registry[type[SparseFormat]]" = Registry("format", discover="sparsemerge.formats")
CODECS: "Registry[type[ValueCodec]]" = Registry("value codec")


@dataclass(frozen=True)
class FormatOption:
    """A packing option a format (or pack layout) reads: a key of
    :class:`~sparsemerge.formats.model.PackConfig` and the ``sparsemerge pack`` flag
    :attr:`flag`, with its default, type and one-line help (shown by ``pack --help``)."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] = str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class PackOptions(Protocol):
    """What a format reads of the pack configuration (``PackConfig`` implements it)."""

    def option(self, name: str) -> Any:
        """The value of a declared :class:`FormatOption` (its default when not given)."""


@dataclass(frozen=True)
class PackLayout:
    """A checkpoint layout ``sparsemerge pack --format NAME`` writes instead of the
    sparsemerge-packed folder (e.g. compressed-tensors ``sparse-24-bitmask``). ``write(src, out,
    config, overwrite=..., progress=...)`` returns a :class:`~sparsemerge.formats.model.PackReport`;
    ``plan_rows(p)`` its rows in the size plan (:func:`sparsemerge.formats.size.plan`)."""

    name: str
    help: str
    write: Callable[..., Any]
    options: tuple[FormatOption, ...] = ()
    plan_rows: Optional[Callable[[Any], list]] = None
    plan_order: int = 100


LAYOUTS: "Registry[PackLayout]" = Registry("pack layout", discover="sparsemerge.formats")


def pack_formats() -> dict[str, str]:
    """Every value of ``sparsemerge pack --format`` with its one-line help: the registered
    tensor formats (written in the sparsemerge-packed layout), then the pack layouts."""
    out = {name: FORMATS.get(name).help for name in FORMATS.names()}
    for name in LAYOUTS.names():
        if name in out:
            raise RuntimeError(f"{name!r} is registered both as a format and as a pack layout")
        out[name] = LAYOUTS.get(name).help
    return out


def check_pack_format(name: str) -> str:
    """``name`` when it is a registered format or pack layout; else the known names in the error."""
    known = pack_formats()
    if name not in known:
        raise SparsemergeError(f"unknown format {name!r}; known formats: {', '.join(known)}")
    return name


def format_options() -> dict[str, FormatOption]:
    """The options declared by every format and pack layout, by name (the first declaration of
    a name is the one shown; formats sharing an option share its key and flag)."""
    out: dict[str, FormatOption] = {}
    for name in pack_formats():
        entry: Any = LAYOUTS.get(name) if name in LAYOUTS else FORMATS.get(name)
        for option in entry.options:
            out.setdefault(option.name, option)
    return out


def need(fields: dict[str, torch.Tensor], key: str, dtype: "torch.dtype | None", shape: "tuple[int, ...] | None", what: str) -> torch.Tensor:
    """Fetch one storage field and check its dtype and shape (a corrupt/mismatched file fails here)."""
    if key not in fields:
        raise SparsemergeError(f"{what}: storage field {key!r} is missing (have {sorted(fields)})")
    tensor = fields[key]
    if dtype is not None and tensor.dtype != dtype:
        raise SparsemergeError(f"{what}: field {key!r} has dtype {dtype_name(tensor.dtype)}, expected {dtype_name(dtype)}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise SparsemergeError(f"{what}: field {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


class ValueCodec(abc.ABC):
    """Encodes a float tensor of values (2-D ``(rows, k)``; 1-D values are viewed as one row)."""

    kind: ClassVar[str]
    shape: tuple[int, ...]  # shape of the values this codec stands for

    @abc.abstractmethod
    def decode(self) -> torch.Tensor:
        """The approximated values as float32, in :attr:`shape`."""

    @abc.abstractmethod
    def fields(self) -> dict[str, torch.Tensor]:
        """Storage tensors (keys without the ``values.`` prefix)."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON parameters; ``params()["kind"]`` names the codec."""

    @classmethod
    @abc.abstractmethod
    def from_fields(cls, shape: tuple[int, ...], params: dict[str, Any], fields: dict[str, torch.Tensor], what: str) -> "ValueCodec":
        """Rebuild from storage; raise SparsemergeError naming ``what`` on any mismatch."""

    @classmethod
    @abc.abstractmethod
    def encode(cls, values: torch.Tensor, spec: "CodecSpec") -> "ValueCodec":
        """Encode float ``values`` as ``spec`` says (``spec.kind`` is a name this class is registered under)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields().values())


@dataclass(frozen=True)
class CodecSpec:
    """What to do with a format's values: ``kind`` none|int8|int4|codebook.

    ``group_size``: quantization group of G consecutive stored values along a row; 0 means
    one scale per row (per output channel). ``k``: codebook size (4..256).
    """

    kind: str = "none"
    group_size: int = 128
    symmetric: bool = True
    k: int = 16

    def __post_init__(self) -> None:
        if self.kind not in ("none", "int8", "int4", "codebook"):
            raise SparsemergeError(f"unknown value codec {self.kind!r}; use none, int8, int4 or codebook")
        if self.group_size < 0:
            raise SparsemergeError(f"group size must be >= 0 (0 = per output channel), got {self.group_size}")
        if self.kind == "codebook" and not 4 <= self.k <= 256:
            raise SparsemergeError(f"codebook size k must be in 4..256, got {self.k}")

    def encode(self, values: torch.Tensor) -> "torch.Tensor | ValueCodec":
        if self.kind == "none":
            return values
        return CODECS.get(self.kind).encode(values, self)


def codec_from_fields(shape: tuple[int, ...], params: dict[str, Any], fields: dict[str, torch.Tensor], what: str) -> ValueCodec:
    if not isinstance(params, dict) or "kind" not in params:
        raise SparsemergeError(f"{what}: codec parameters {params!r} have no 'kind'")
    return CODECS.get(str(params["kind"])).from_fields(shape, params, fields, what)


class SparseFormat(abc.ABC):
    """A 2-D tensor ``(rows, cols)`` in a storage format.

    Subclasses set ``name``, implement ``from_dense``, ``_dense_into`` (scatter the float
    values into a zero tensor), ``_index_fields``, ``_params``, ``_from_index_fields`` and
    ``check``. ``values`` are the stored values (float tensor), or a :class:`ValueCodec`
    standing for them; :attr:`values_float` always gives floats.
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""  # one line, shown by ``sparsemerge pack --help``
    options: ClassVar[tuple[FormatOption, ...]] = ()  # packing options this format reads (pack_params)
    plan_order: ClassVar[int] = 100  # position of its rows in the size plan
    float_values_only: ClassVar[bool] = True
    two_d_only: ClassVar[bool] = True  # False: any shape (dense)
    shape: tuple[int, int]
    dtype: torch.dtype  # dtype of the dense tensor this stands for
    values: "torch.Tensor | ValueCodec"

    # --- construction -------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_dense(cls, dense: torch.Tensor, **params: Any) -> "SparseFormat":
        """Encode a dense 2-D tensor."""

    @abc.abstractmethod
    def _values_shape(self) -> tuple[int, ...]:
        """Shape of the float values array implied by the index fields."""

    @abc.abstractmethod
    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        """The dense tensor given float values of :meth:`_values_shape`."""

    @abc.abstractmethod
    def _index_fields(self) -> dict[str, torch.Tensor]:
        """Storage fields other than the values."""

    @abc.abstractmethod
    def _params(self) -> dict[str, Any]:
        """Format parameters besides shape, dtype and codec."""

    @classmethod
    @abc.abstractmethod
    def _from_index_fields(
        cls, shape: tuple[int, int], dtype: torch.dtype, params: dict[str, Any], fields: dict[str, torch.Tensor], what: str
    ) -> "SparseFormat":
        """Rebuild without values (``values`` set by :meth:`from_fields`)."""

    @abc.abstractmethod
    def check(self, full: bool = False) -> None:
        """Raise SparsemergeError when the storage is inconsistent; ``full`` decodes everything."""

    # --- registry hooks: packing and the size plan --------------------------------------
    @classmethod
    def pack_params(cls, shape: tuple[int, ...], config: PackOptions) -> tuple[dict[str, Any], Optional[str]]:
        """``from_dense`` keyword arguments for a targeted 2-D weight of ``shape`` under the pack
        options, or ``(params, reason)`` with a reason to store it dense instead."""
        return {}, None

    @classmethod
    def plan_rows(cls, p: Any) -> list:
        """Rows of the size plan (:class:`~sparsemerge.formats.size.PlanRow`) for
        :class:`~sparsemerge.formats.size.PlanInput` ``p``; none by default."""
        return []

    @classmethod
    def plan_quant_rows(cls, p: Any) -> list:
        """Rows with quantized values (``p.quant_bits`` set), listed after every plain row."""
        return []

    # --- shared behaviour -----------------------------------------------------------
    @property
    def values_float(self) -> torch.Tensor:
        if isinstance(self.values, ValueCodec):
            return self.values.decode().to(self.dtype)
        return self.values

    @property
    def codec(self) -> Optional[ValueCodec]:
        return self.values if isinstance(self.values, ValueCodec) else None

    def to_dense(self) -> torch.Tensor:
        return self._dense_from_values(self.values_float)

    def with_codec(self, spec: CodecSpec) -> "SparseFormat":
        """Encode the (float) values with a codec; returns self for ``kind == 'none'``."""
        if spec.kind == "none":
            return self
        if self.codec is not None:
            raise SparsemergeError(f"{self.name}: values are already encoded with {self.codec.kind}")
        self.values = spec.encode(self.values)
        return self

    def fields(self) -> dict[str, torch.Tensor]:
        out = dict(self._index_fields())
        if isinstance(self.values, ValueCodec):
            out.update({f"values.{k}": v for k, v in self.values.fields().items()})
        else:
            out["values"] = self.values
        return out

    def params(self) -> dict[str, Any]:
        return {**self._params(), "codec": self.codec.params() if self.codec is not None else None}

    @classmethod
    def from_fields(
        cls, shape: tuple[int, int], dtype: torch.dtype, params: dict[str, Any], fields: dict[str, torch.Tensor], what: str = "tensor"
    ) -> "SparseFormat":
        if cls.two_d_only and len(shape) != 2:  # a manifest entry says so: the index fields assume (rows, cols)
            raise SparsemergeError(f"{what}: {cls.name} stores 2-D weights, but the entry gives shape {list(shape)}")
        obj = cls._from_index_fields(tuple(shape), dtype, params, fields, what)  # type: ignore[arg-type]
        vshape = obj._values_shape()
        codec_params = params.get("codec")
        if codec_params:
            sub = {k[len("values."):]: v for k, v in fields.items() if k.startswith("values.")}
            obj.values = codec_from_fields(vshape, codec_params, sub, what)
        else:
            obj.values = need(fields, "values", None, vshape, what)
            if cls.float_values_only and not obj.values.is_floating_point():
                raise SparsemergeError(f"{what}: field 'values' has dtype {dtype_name(obj.values.dtype)}, expected a float dtype")
        return obj

    @property
    def nbytes(self) -> int:
        """Bytes of all storage fields (what the packed file holds for this tensor)."""
        return sum(t.numel() * t.element_size() for t in self.fields().values())

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to_coo(self) -> "SparseFormat":
        return FORMATS.get("coo").from_dense(self.to_dense())

    @classmethod
    def from_coo(cls, coo: "SparseFormat", **params: Any) -> "SparseFormat":
        return cls.from_dense(coo.to_dense(), **params)

    def __repr__(self) -> str:
        codec = f", codec={self.codec.kind}" if self.codec is not None else ""
        return f"{type(self).__name__}(shape={self.shape}, dtype={dtype_name(self.dtype)}, nbytes={self.nbytes}{codec})"


def check_2d(dense: torch.Tensor, fmt: str) -> torch.Tensor:
    if not isinstance(dense, torch.Tensor):
        raise SparsemergeError(f"{fmt}: expected a torch.Tensor, got {type(dense).__name__}")
    if dense.dim() != 2:
        raise SparsemergeError(f"{fmt} stores 2-D weights (out_features, in_features); got shape {tuple(dense.shape)}")
    if not dense.is_floating_point():
        raise SparsemergeError(f"{fmt} stores float weights; got dtype {dtype_name(dense.dtype)}")
    return dense.detach().cpu().contiguous()


def convert(obj: SparseFormat, target: str, **params: Any) -> SparseFormat:
    """Convert between formats through the COO hub (values are decoded; codecs are dropped)."""
    return FORMATS.get(target).from_coo(obj.to_coo(), **params)


class TensorTable:
    """Container protocol of a checkpoint reader whose ``self.tensors`` maps tensor names to
    their records: ``names()``, ``len()`` and ``in``."""

    tensors: dict

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)
