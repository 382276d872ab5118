"""An independent check of the golden files (tests/formats/golden/): they are snapshots the
project wrote itself, so here they are decoded - and their N:M metadata and quantized codes
re-encoded - by hand-written reference code that follows only the documented layouts:

* safetensors: 8-byte little-endian header length, JSON header, data section
  (https://github.com/huggingface/safetensors#format), parsed with ``struct`` + ``json``
  and cross-checked against the ``safetensors`` library;
* the packed manifest (``layout.json``: formats/model.py docstring), its ``nbytes`` and
  ``sha256`` (io/checksum.py ``record_digest`` over ``fields_digest``);
* the field layouts in the docstrings of formats/bits.py, nm.py, nm_coding.py, quant.py,
  codebook.py, bitmask.py, coo.py, csr.py, bsr.py and ct.py;
* the compressed-tensors layout also against the compressed-tensors library (peer venv).

The reference readers live in tests/layout_reference.py (nothing from ``sparsemerge``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from layout_reference import (TORCH_NAMES, bitmask_bits, decode_tensor, dequantize, encode_nm_metadata, nm_slots,
                              nm_stored_values, quantize_reference, read_safetensors, unpack_nibbles)
from test_formats_golden import GOLDEN, VARIANTS, golden_source

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT / ".venv-peers" / "compressed-tensors" / "bin" / "python"
WEIGHT = "model.layers.0.mlp.up_proj.weight"


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
        # record_digest (layout version 2): sha256 over "sparsemerge-tensor\0" NAME "\0", the entry
        # without its sha256 as canonical JSON (sorted keys, no spaces), "\0" and the fields digest
        entry = {k: v for k, v in record.items() if k != "sha256"}
        sealed = hashlib.sha256(b"sparsemerge-tensor\0" + name.encode() + b"\0"
                                + json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
                                + b"\0" + digest.hexdigest().encode())
        assert record["sha256"] == sealed.hexdigest() and record["nbytes"] == nbytes, name
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
            stored = want if record["format"] == "dense" else nm_stored_values(want, record["params"])
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
