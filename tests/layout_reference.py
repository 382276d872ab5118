"""Reference readers written from the documented layouts alone, for tests that check the
project's files independently of its own readers (nothing from ``sparsemerge`` is imported):

* safetensors: 8-byte little-endian header length, JSON header, data section
  (https://github.com/huggingface/safetensors#format), parsed with ``struct`` + ``json``;
* the field layouts in the docstrings of sparsemerge/formats/bits.py, nm.py, nm_coding.py,
  quant.py, codebook.py, bitmask.py, coo.py, csr.py and bsr.py;
* perplexity ``exp(mean next-token NLL)`` by a plain loop.

Plain Python integers and numpy only, so a shared mistake with the library is unlikely.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

# safetensors dtype codes -> numpy (little-endian) and the manifest's torch names
ST_DTYPES = {"F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
TORCH_NAMES = {"F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}


def read_safetensors(path: Path) -> tuple[dict[str, tuple[str, np.ndarray, bytes]], dict]:
    """Raw parse: ``{key: (dtype code, array, raw bytes)}`` and the header's ``__metadata__``."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = body[begin:end]
        arr = np.frombuffer(raw, dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        assert arr.nbytes == end - begin, key
        out[key] = (info["dtype"], arr, raw)
        spans.append((begin, end))
    # the data section is exactly the tensors, back to back (no holes, no overlap)
    spans.sort()
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] == len(body)
    return out, header.get("__metadata__", {})


def bit_reader(stream: np.ndarray):
    """bits.py order: stream bit k is bit k % 8 of byte k // 8; a code is read LSB first."""
    as_int = int.from_bytes(bytes(stream.astype(np.uint8)), "little")
    return lambda offset, width: (as_int >> offset) & ((1 << width) - 1)


def bit_writer(codes: list[tuple[int, int]], nbytes: int) -> list[int]:
    """(value, width) codes appended LSB first -> ``nbytes`` bytes (trailing bits zero)."""
    total, offset = 0, 0
    for value, width in codes:
        assert 0 <= value < (1 << width) or width == 0
        total |= value << offset
        offset += width
    assert offset <= 8 * nbytes
    return list(total.to_bytes(nbytes, "little"))


def colex_rank(positions: list[int]) -> int:
    return sum(math.comb(p, i + 1) for i, p in enumerate(positions))


def colex_unrank(rank: int, n: int) -> list[int]:
    """Greedy: for i = n..1 the largest p with C(p, i) <= rank."""
    out = []
    for i in range(n, 0, -1):
        p = i - 1
        while math.comb(p + 1, i) <= rank:
            p += 1
        out.append(p)
        rank -= math.comb(p, i)
    return out[::-1]


def nm_slots(group: np.ndarray, n: int) -> list[int]:
    """The group's N slots: its nonzeros, then its lowest-index zeros, ascending (nm.py)."""
    nonzero = [j for j, v in enumerate(group) if v != 0]
    assert len(nonzero) <= n
    zeros = [j for j, v in enumerate(group) if v == 0][: n - len(nonzero)]
    return sorted(nonzero + zeros)


def nm_metadata(rows: int, cols: int, n: int, m: int, coding: str, stream: np.ndarray) -> list[list[list[int]]]:
    """Decode positions ``[row][group] -> [p_1 < .. < p_N]`` from the bitstream (nm_coding.py)."""
    read = bit_reader(stream)
    groups, combos = cols // m, math.comb(m, n)
    out = []
    for r in range(rows):
        if coding == "bits2":
            w = (m - 1).bit_length()
            out.append([[read(((r * groups + g) * n + i) * w, w) for i in range(n)] for g in range(groups)])
        elif coding == "index":
            w = (combos - 1).bit_length()
            out.append([colex_unrank(read((r * groups + g) * w, w), n) for g in range(groups)])
        else:  # entropy: one mixed-radix integer V = sum_j r_j C^j per row, in bitlength(C^G - 1) bits
            row_bits = (combos**groups - 1).bit_length()
            value = read(r * row_bits, row_bits)
            ranks = []
            for _ in range(groups):
                value, digit = divmod(value, combos)
                ranks.append(digit)
            assert value == 0
            out.append([colex_unrank(x, n) for x in ranks])
    return out


def encode_nm_metadata(dense: np.ndarray, n: int, m: int, coding: str, nbytes: int) -> list[int]:
    """The bytes the docstrings prescribe for ``dense``'s positions, written from scratch."""
    rows, cols = dense.shape
    groups, combos = cols // m, math.comb(m, n)
    slots = [[nm_slots(dense[r, g * m : (g + 1) * m], n) for g in range(groups)] for r in range(rows)]
    if coding == "bits2":
        w = (m - 1).bit_length()
        return bit_writer([(p, w) for row in slots for grp in row for p in grp], nbytes)
    if coding == "index":
        w = (combos - 1).bit_length()
        return bit_writer([(colex_rank(grp), w) for row in slots for grp in row], nbytes)
    row_bits = (combos**groups - 1).bit_length()
    return bit_writer([(sum(colex_rank(grp) * combos**j for j, grp in enumerate(row)), row_bits) for row in slots], nbytes)


def nm_stored_values(dense: np.ndarray, params: dict) -> np.ndarray:
    """The N:M ``values`` field: each group's slot values in slot order, ``(rows, cols*N/M)``."""
    n, m = params["n"], params["m"]
    rows, cols = dense.shape
    return np.array([[dense[r, g * m + p] for g in range(cols // m) for p in nm_slots(dense[r, g * m : (g + 1) * m], n)]
                     for r in range(rows)], dtype=np.float32)


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """INT4 codes: column 2j in the low nibble of byte j, 2j+1 in the high one, two's complement."""
    j = np.arange(k)
    nib = (packed[:, j // 2].astype(np.int64) >> (4 * (j % 2))) & 0xF
    return np.where(nib >= 8, nib - 16, nib)


def quantize_reference(x: np.ndarray, bits: int, group: int, symmetric: bool):
    """quant.py's formulas in float32 (round half to even): codes, scale, zero point."""
    x = x.astype(np.float32)
    rows, k = x.shape
    group = group or k
    n_groups = -(-k // group)
    codes = np.zeros((rows, k), dtype=np.int64)
    scale = np.zeros((rows, n_groups), dtype=np.float32)
    zp = np.zeros((rows, n_groups), dtype=np.int64)
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    for r in range(rows):
        for g in range(n_groups):
            v = x[r, g * group : (g + 1) * group]
            if symmetric:
                amax = np.abs(v).max()
                s = amax / np.float32(qmax) if amax > 0 else np.float32(1.0)
                q = np.clip(np.round(v / s), -qmax, qmax)
            else:
                lo, hi = min(v.min(), np.float32(0)), max(v.max(), np.float32(0))
                s = (hi - lo) / np.float32(qmax - qmin) if hi != lo else np.float32(1.0)
                z = np.clip(np.round(np.float32(qmin) - lo / s), qmin, qmax)
                q = np.clip(np.round(v / s) + z, qmin, qmax)
                zp[r, g] = int(z)
            scale[r, g] = s
            codes[r, g * group : (g + 1) * group] = q.astype(np.int64)
    return codes, scale, zp


def dequantize(codes: np.ndarray, scale: np.ndarray, zp: "np.ndarray | None", group: int) -> np.ndarray:
    k = codes.shape[1]
    group = group or k
    cols = np.arange(k) // group
    z = zp[:, cols].astype(np.float32) if zp is not None else np.float32(0)
    return (codes.astype(np.float32) - z) * scale[:, cols]


def bitmask_bits(packed: np.ndarray, cols: int) -> np.ndarray:
    """Bit j of a row is bit j % 8 of byte j // 8 (LSB first)."""
    return np.array([[(int(row[j // 8]) >> (j % 8)) & 1 for j in range(cols)] for row in packed], dtype=bool)


def decode_values(fields: dict[str, np.ndarray], codec: "dict | None", shape: tuple) -> np.ndarray:
    """A format's stored values (``values`` or the ``values.*`` codec fields) as float32."""
    if codec is None:
        return fields["values"].astype(np.float32)
    if codec["kind"] == "codebook":
        nnz = int(np.prod(shape))
        w = (codec["k"] - 1).bit_length()
        read = bit_reader(fields["values.indices"])
        idx = np.array([read(i * w, w) for i in range(nnz)], dtype=np.int64)
        return fields["values.centroids"][idx].reshape(shape)
    k = shape[1]
    codes = fields["values.codes"]
    codes = unpack_nibbles(codes, k) if codec["bits"] == 4 else codes.astype(np.int64)
    return dequantize(codes, fields["values.scale"], fields.get("values.zero_point"), codec["group_size"])


def decode_tensor(record: dict, fields: dict[str, np.ndarray]) -> np.ndarray:
    """One manifest record + its raw fields -> the dense float32 tensor, per the format docstrings."""
    fmt, shape, params = record["format"], tuple(record["shape"]), record["params"]
    codec = params.get("codec")
    if fmt == "dense":
        return decode_values(fields, codec, shape).reshape(shape)
    rows, cols = shape
    dense = np.zeros(shape, dtype=np.float32)
    if fmt == "nm":
        n, m = params["n"], params["m"]
        values = decode_values(fields, codec, (rows, cols * n // m))
        positions = nm_metadata(rows, cols, n, m, params["metadata"], fields["metadata"])
        for r in range(rows):
            for g, grp in enumerate(positions[r]):
                for i, p in enumerate(grp):
                    dense[r, g * m + p] = values[r, g * n + i]
    elif fmt == "bitmask":
        mask = bitmask_bits(fields["bitmask"], cols)
        dense[mask] = decode_values(fields, codec, (int(mask.sum()),))  # row-major nonzeros
    elif fmt == "coo":
        dense[fields["row"].astype(np.int64), fields["col"].astype(np.int64)] = decode_values(fields, codec, fields["row"].shape)
    elif fmt == "csr":
        values, indptr = decode_values(fields, codec, fields["indices"].shape), fields["indptr"]
        for r in range(rows):
            for e in range(indptr[r], indptr[r + 1]):
                dense[r, fields["indices"][e]] = values[e]
    elif fmt == "bsr":
        (br, bc), indptr = params["block"], fields["indptr"]
        values = decode_values(fields, codec, fields["values"].shape)
        for b in range(rows // br):
            for e in range(indptr[b], indptr[b + 1]):
                c = int(fields["indices"][e])
                dense[b * br : (b + 1) * br, c * bc : (c + 1) * bc] = values[e]
    else:
        raise AssertionError(f"no reference decoder for {fmt!r}")
    return dense


def hand_perplexity(model, windows) -> float:
    """exp(mean next-token cross-entropy) over ``(n, seqlen)`` windows, each predicting its
    tokens 2..seqlen, in float64 from the model's logits."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].double()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, windows[:, 1:, None])
    return math.exp(-float(logp.mean()))
