"""Compressed storage of sparse (and quantized) weights (chapter 10.2.2, 10.4.1-10.4.3).

Tensor formats, one module each, all :class:`~sparsemerge.formats.base.SparseFormat`
(``from_dense``, ``to_dense``, ``nbytes``, ``check(full=...)``, ``fields()``/``params()``
for storage, ``from_fields`` to rebuild), registered in :data:`FORMATS`:

===========  ==========================================================================
``nm``       :class:`NMPacked` - N:M packed values ``(rows, cols*N/M)`` + position
             metadata coded ``bits2`` | ``index`` | ``entropy`` (:mod:`.nm_coding`)
``hnm``      :class:`HNMPacked` - hierarchical N:M (``hier:K:L@RxB/N:M``): kept-block
             bitmap per row tile + the N:M packed values/positions of the kept blocks
``bitmask``  :class:`Bitmask` - 1 bit per element + nonzero values
``coo``      :class:`COO` - row, column, value per nonzero
``csr``      :class:`CSR` - row pointers, column indices, values
``bsr``      :class:`BSR` - block rows of dense ``R x C`` blocks
``dense``    :class:`Dense` - untouched tensors (optionally quantized)
===========  ==========================================================================

A new format is one module here that registers itself with ``@FORMATS.register(name)``
and sets ``help`` (one line for ``sparsemerge pack --help``), ``options``
(:class:`~.base.FormatOption`: its ``pack`` flags and ``PackConfig`` keys), ``pack_params``
(its ``from_dense`` arguments for a weight, or why it stays dense) and ``plan_rows`` (its
bytes in the size plan). The registry imports every module of this package on first lookup,
so nothing else needs editing. Whole-checkpoint layouts written instead of the packed folder
(compressed-tensors) register a :class:`~.base.PackLayout` in ``LAYOUTS``.

Value codecs wrap any format's values (``fmt.with_codec(CodecSpec(...))``):
:mod:`.quant` (INT8/INT4, symmetric/asymmetric, per channel or per group;
``quantize``/``dequantize``) and :mod:`.codebook` (k-means, k = 4..256).

Kernel contract (issue 4): ``NMPacked.shape``, ``.n``, ``.m``, ``.values`` (float tensor
``(rows, cols*n//m)`` or a codec; ``.values_float`` decodes, ``.codec`` is the codec or
None), ``.positions()`` (uint8 in-group positions, same shape as the values). Codec
``QuantizedValues``: ``.int8_codes()``, ``.scale`` (float32 ``(rows, n_groups)``),
``.zero_point`` (int8 or None), ``.bits``, ``.group_size``, ``.symmetric``.

Model level: :mod:`.model` (``pack``, and ``unpack`` / ``read_packed`` from :mod:`.reader`;
on-disk layout in its docstring; the safetensors shards are written and read by
:mod:`sparsemerge.io.writer` and :mod:`sparsemerge.io.reader`),
:mod:`.ct` (compressed-tensors ``sparse-24-bitmask``), :mod:`.size` (the size calculator
behind ``sparsemerge inspect --plan``), :mod:`.inspect` (the per-tensor rows of ``sparsemerge inspect``). Bit order and index dtypes: :mod:`.bits`.
"""
from sparsemerge.formats.base import CODECS, FORMATS, CodecSpec, SparseFormat, ValueCodec, convert
from sparsemerge.formats.bitmask import Bitmask
from sparsemerge.formats.bsr import BSR
from sparsemerge.formats.codebook import Codebook, fit_codebook
from sparsemerge.formats.coo import COO
from sparsemerge.formats.csr import CSR
from sparsemerge.formats.dense import Dense
from sparsemerge.formats.hnm import HNMPacked
from sparsemerge.formats.nm import NMPacked
from sparsemerge.formats.quant import QuantizedValues, dequantize, quantize

__all__ = [
    "CODECS",
    "FORMATS",
    "CodecSpec",
    "SparseFormat",
    "ValueCodec",
    "convert",
    "Bitmask",
    "BSR",
    "COO",
    "CSR",
    "Dense",
    "NMPacked",
    "HNMPacked",
    "Codebook",
    "fit_codebook",
    "QuantizedValues",
    "quantize",
    "dequantize",
]
