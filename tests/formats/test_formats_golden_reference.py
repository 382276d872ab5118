"""An independent check of the golden files (tests/formats/golden/): they are snapshots the
project wrote itself, so here they are decoded - and their N:M metadata and quantized codes
re-encoded - by hand-written reference code that follows only the documented layouts:

* safetensors: 8-byte little-endian header length, JSON header, data section
  (https://github.com/huggingface/safetensors#format), parsed with ``struct`` + ``json``
  and cross-checked against the ``safetensors`` library;
* the packed manifest (``layout.json``: formats/model.py docstring), its ``nbytes`` and
  ``sha256`` (formats/shards.py ``fields_digest``);
* the field layouts in the docstrings of formats/bits.py, nm.py, nm_coding.py, quant.py,
  codebook.py, bitmask.py, coo.py, csr.py, bsr.py and ct.py;
* the compressed-tensors layout also against the compressed-tensors library (peer venv).

Nothing from ``sparsemerge.formats`` is imported: plain Python integers and numpy only.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from test_formats_golden import GOLDEN, VARIANTS, golden_source

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / ".venv-peers" / "compressed-tensors" / "bin" / "python"
WEIGHT = "model.layers.0.mlp.up_proj.weight"
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


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """INT4 codes: column 2j in the low nibble of byte j, 2j+1 in the high one, two's complement."""
    out = np.zeros((packed.shape[0], k), dtype=np.int64)
    for r in range(packed.shape[0]):
        for j in range(k):
            nib = (int(packed[r, j // 2]) >> (4 * (j % 2))) & 0xF
            out[r, j] = nib - 16 if nib >= 8 else nib
    return out


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


def source_tensors(tmp_path: Path) -> dict[str, np.ndarray]:
    src = golden_source(tmp_path / "src")
    tensors, _ = read_safetensors(src / "model.safetensors")
    return {k: arr for k, (_, arr, _) in tensors.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_raw_parse_matches_the_safetensors_library(variant):
    from safetensors.numpy import load_file

    files = sorted((GOLDEN / variant).glob("*.safetensors"))
    assert files
    for path in files:
        raw, metadata = read_safetensors(path)
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert n % 8 == 0  # header padded to 8 bytes, so every tensor starts aligned
        library = load_file(str(path))
        assert raw.keys() == library.keys()
        for key, (_, arr, _) in raw.items():
            assert library[key].dtype == arr.dtype and np.array_equal(library[key], arr), key
        assert metadata == ({"format": "pt"} if variant == "sparse-24-bitmask" else {"format": "sparsemerge-packed"})


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v != "sparse-24-bitmask"))
def test_golden_packed_files_decode_by_hand(tmp_path, variant):
    source = source_tensors(tmp_path)
    layout = json.loads((GOLDEN / variant / "layout.json").read_text())
    shards = {name: read_safetensors(GOLDEN / variant / name)[0] for name in layout["shards"]}
    assert set(layout["tensors"]) == set(source)
    stored_keys = set()
    for name, record in layout["tensors"].items():
        assert record["shape"] == list(source[name].shape) and record["dtype"] == "float32"
        assert name in layout["shards"][record["shard"]]
        tensors = shards[record["shard"]]
        fields, digest, nbytes = {}, hashlib.sha256(), 0
        for field in sorted(record["fields"]):
            info = record["fields"][field]
            assert info["key"] == f"{name}:{field}"
            code, arr, raw = tensors[info["key"]]
            assert TORCH_NAMES[code] == info["dtype"] and list(arr.shape) == info["shape"], info["key"]
            # fields_digest: sha256 over "field \0 dtype \0 shape \0" + bytes, fields sorted
            digest.update(f"{field}\0{info['dtype']}\0{','.join(map(str, arr.shape))}\0".encode() + raw)
            fields[field], nbytes = arr, nbytes + len(raw)
            stored_keys.add(info["key"])
        assert record["sha256"] == digest.hexdigest() and record["nbytes"] == nbytes, name
        decoded = decode_tensor(record, fields)
        codec = record["params"].get("codec")
        want = source[name]
        if codec is None:
            assert np.array_equal(decoded, want), name
        elif codec["kind"] == "codebook":
            # keep_zero: one centroid pinned at 0.0 (the centroids are stored sorted, so it need not
            # be the first), so zeros - pruned slots - stay exact
            centroids = fields["values.centroids"]
            assert codec["keep_zero"] and (centroids == 0).sum() == 1 and np.all(np.diff(centroids) > 0)
            nonzero = want[want != 0]
            assert np.array_equal(bitmask_bits(fields["bitmask"], want.shape[1]), want != 0)
            # Lloyd's fixed point: every free centroid is the mean of the nonzeros nearest to it
            free = centroids[centroids != 0]
            cluster = np.abs(nonzero[:, None].astype(np.float64) - free[None, :]).argmin(axis=1)
            assert np.allclose(free, [nonzero[cluster == c].astype(np.float64).mean() for c in range(free.size)], atol=1e-6)
            # each value is coded as a nearest centroid (Lloyd's assignment step)
            dist = np.abs(nonzero[:, None] - centroids[None, :])
            got = np.abs(nonzero - decoded[want != 0])
            assert np.all(got <= dist.min(axis=1) + 1e-7), name
            assert np.array_equal(decoded[want == 0], want[want == 0])
        else:  # int4 / int8: re-encode the stored values by quant.py's formulas; codes and scales must match
            stored = want if record["format"] == "dense" else _nm_stored_values(want, record["params"])
            codes, scale, zp = quantize_reference(stored, codec["bits"], codec["group_size"], codec["symmetric"])
            got_codes = fields["values.codes"]
            got_codes = unpack_nibbles(got_codes, stored.shape[1]) if codec["bits"] == 4 else got_codes.astype(np.int64)
            assert np.array_equal(got_codes, codes) and np.array_equal(fields["values.scale"], scale), name
            if not codec["symmetric"]:
                assert np.array_equal(fields["values.zero_point"].astype(np.int64), zp), name
            # |x - x_hat| <= scale / 2 and zeros exact
            cols = np.arange(stored.shape[1]) // (codec["group_size"] or stored.shape[1])
            x_hat = dequantize(codes, scale, zp if not codec["symmetric"] else None, codec["group_size"])
            assert np.all(np.abs(stored - x_hat) <= scale[:, cols] / 2 + 1e-6), name
            assert np.array_equal(decoded[want == 0], want[want == 0]), name
        if record["format"] == "nm":  # and the metadata bytes are what the docstring prescribes
            p = record["params"]
            expected = encode_nm_metadata(want, p["n"], p["m"], p["metadata"], fields["metadata"].size)
            assert fields["metadata"].tolist() == expected, name
    # nothing in the shards that the manifest does not describe
    assert stored_keys == {k for tensors in shards.values() for k in tensors}


def _nm_stored_values(dense: np.ndarray, params: dict) -> np.ndarray:
    """The N:M ``values`` field: each group's slot values in slot order, ``(rows, cols*N/M)``."""
    n, m = params["n"], params["m"]
    rows, cols = dense.shape
    return np.array([[dense[r, g * m + p] for g in range(cols // m) for p in nm_slots(dense[r, g * m : (g + 1) * m], n)]
                     for r in range(rows)], dtype=np.float32)


def test_golden_compressed_tensors_layout_decodes_by_hand(tmp_path):
    """sparse-24-bitmask (ct.py): ``MOD.compressed`` kept values row-major, ``MOD.bitmask``
    little-endian bits per row with exactly 2 per group of 4, ``MOD.shape`` int64 (2, 1)."""
    source = source_tensors(tmp_path)
    tensors, _ = read_safetensors(GOLDEN / "sparse-24-bitmask" / "model.safetensors")
    layout = json.loads((GOLDEN / "sparse-24-bitmask" / "layout.json").read_text())["quantization_config"]
    sparsity = layout["sparsity_config"]
    assert layout["quant_method"] == "compressed-tensors" and sparsity["format"] == "sparse-24-bitmask"
    module = WEIGHT.removesuffix(".weight")
    assert sparsity["targets"] == [module]
    want = source[WEIGHT]
    assert sparsity["global_sparsity"] == float((want == 0).sum()) / want.size
    _, shape, _ = tensors[f"{module}.shape"]
    assert shape.dtype == np.int64 and shape.reshape(-1).tolist() == list(want.shape)
    mask = bitmask_bits(tensors[f"{module}.bitmask"][1], want.shape[1])
    assert (mask.reshape(-1, 4).sum(1) == 2).all()
    slots = np.zeros_like(mask)
    for r in range(want.shape[0]):  # kept bits: the nonzeros, then lowest-index zeros
        for g in range(want.shape[1] // 4):
            slots[r, [g * 4 + p for p in nm_slots(want[r, g * 4 : g * 4 + 4], 2)]] = True
    assert np.array_equal(mask, slots)
    compressed = tensors[f"{module}.compressed"][1]
    assert compressed.shape == (want.shape[0], want.shape[1] // 2)
    dense = np.zeros_like(want)
    dense[mask] = compressed.reshape(-1)
    assert np.array_equal(dense, want)
    # every other tensor is stored as it is
    assert set(tensors) == {f"{module}.compressed", f"{module}.bitmask", f"{module}.shape", *(k for k in source if k != WEIGHT)}
    for key in source:
        if key != WEIGHT:
            assert np.array_equal(tensors[key][1], source[key]), key


@pytest.mark.peer
def test_golden_compressed_tensors_file_reads_in_the_library(tmp_path):
    """The committed sparse-24-bitmask file, checked by compressed-tensors itself."""
    if not PEER.exists():
        pytest.skip("peer venv missing: run benchmarks/bench_storage_setup_peers.sh")
    dense = golden_source(tmp_path / "src")
    ct = tmp_path / "ct"
    ct.mkdir()
    shutil.copy(GOLDEN / "sparse-24-bitmask" / "model.safetensors", ct / "model.safetensors")
    layout = json.loads((GOLDEN / "sparse-24-bitmask" / "layout.json").read_text())
    (ct / "config.json").write_text(json.dumps({"model_type": "golden-test", **layout}))
    script = ROOT / "benchmarks" / "bench_storage_ct_check.py"
    result = subprocess.run([str(PEER), str(script), str(ct), str(dense)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 1 tensors" in result.stdout
