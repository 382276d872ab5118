"""Fuzzed readers of binary and JSON checkpoint files: the safetensors header
(:mod:`sparsemerge.io.reader`), the shard index and source resolution
(:mod:`sparsemerge.io.sources`, :mod:`sparsemerge.io.tensors`) and the packed manifest
(:mod:`sparsemerge.formats.reader`, compressed-tensors folders included)."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from hypothesis import strategies as st

from fuzz_testlib import Reader, apply_byte_edits, apply_tree_edits, mutate_bytes, nasty, note, tolerate, tree_edits
from sparsemerge.io.dtypes import BY_CODE

CODES = sorted(BY_CODE)

# ---------------------------------------------------------------------------------------------
# safetensors: the 8-byte length, the JSON header, the data section

DIMS = st.one_of(st.integers(0, 4), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 2**70]))


@st.composite
def consistent_header(draw: Any) -> tuple[dict[str, Any], bytes]:
    """A header whose offsets tile the data and whose shapes match their byte counts: shapes
    may still hold dimensions of 2**64 next to a 0 (zero elements), which only ``get`` sees."""
    header: dict[str, Any] = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    entries = []
    for i in range(draw(st.integers(0, 3))):
        code = draw(st.sampled_from(CODES))
        shape = draw(st.lists(DIMS, max_size=4))
        count = 1
        for d in shape:
            count *= d
        if count * BY_CODE[code].itemsize > 64 and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = 0
            count = 0
        entries.append((f"t{i}", code, shape, count * BY_CODE[code].itemsize))
    order = draw(st.permutations(range(len(entries))))
    data, position, offsets = b"", 0, {}
    for j in order:
        name, code, shape, nbytes = entries[j]
        offsets[name] = [position, position + nbytes]
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
        position += nbytes
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": shape, "data_offsets": offsets[name]}
    return header, data


SEED_HEADER = {"__metadata__": {"format": "pt"},
               "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
               "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
               "c": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]}}
SEED_DATA = bytes(range(40))


def encode_safetensors(header: Any, data: bytes, length: "int | None" = None, pad: int = 0, bad_utf8_at: "int | None" = None) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass") + b" " * pad
    if bad_utf8_at is not None:
        raw = raw[: bad_utf8_at % (len(raw) + 1)] + b"\xc3\x28\xff" + raw[bad_utf8_at % (len(raw) + 1):]
    return struct.pack("<Q", len(raw) if length is None else length % 2**64) + raw + data


@st.composite
def safetensors_files(draw: Any) -> bytes:
    """A whole file: a consistent header (deep ``get`` paths), the seed header structurally
    mutated (dtypes, shapes, offsets, non-dict JSON), or raw byte edits of a valid file; then
    maybe a wrong length prefix, invalid UTF-8 in the header, or truncated/extended data."""
    mode = draw(st.sampled_from(["consistent", "mutated", "mutated", "bytes"]))
    if mode == "bytes":
        header, data = draw(consistent_header()) if draw(st.booleans()) else (SEED_HEADER, SEED_DATA)
        return apply_byte_edits(encode_safetensors(header, data), draw(mutate_bytes()), aligned_to=[0])
    if mode == "consistent":
        header, data = draw(consistent_header())
    else:
        values = nasty(CODES + [[0, 24], [24, 0], [0, 2**64], [-8, 24], [0, 40], [0, 0]])
        header = apply_tree_edits(SEED_HEADER, draw(tree_edits(values, keys=["dtype", "shape", "data_offsets", "__metadata__", "d"])))
        data = SEED_DATA
    length = draw(st.none() | st.sampled_from([0, 7, 2**63, 2**64 - 1, 100_000_001]) | st.integers(-16, 16).map(lambda d: ("delta", d)))
    if isinstance(length, tuple):
        length = len(json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")) + length[1]
    tail = draw(st.sampled_from(["exact", "exact", "short", "long"]))
    if tail == "short":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif tail == "long":
        data = data + bytes(draw(st.integers(1, 16)))
    bad = draw(st.none() | st.integers(0, 400)) if draw(st.integers(0, 5)) == 0 else None
    return encode_safetensors(header, data, length, pad=draw(st.integers(0, 7)), bad_utf8_at=bad)


def _read_safetensors(folder: Path, data: bytes) -> None:
    from sparsemerge.io.reader import SafetensorsFile, ShardReader, load_safetensors

    path = folder / "fuzz.safetensors"
    path.write_bytes(data)
    f = tolerate(lambda: SafetensorsFile(path))
    if f is not None:
        with f:
            for name in f.keys():
                f.info(name)
                tolerate(lambda: f.get(name))
    tolerate(lambda: load_safetensors(path))
    reader = ShardReader(folder)
    try:
        keys = tolerate(lambda: reader.keys(path.name)) or []
        tolerate(lambda: reader.header(path.name))
        for key in keys:
            tolerate(lambda: reader.get(path.name, key, "fuzzed tensor"))
    finally:
        reader.close()


SAFETENSORS = Reader(
    "safetensors", setup=lambda folder: folder, strategy=safetensors_files(), read=_read_safetensors,
    doc="SafetensorsFile / ShardReader / load_safetensors on mutated headers and data",
)

# ---------------------------------------------------------------------------------------------
# shard index (model.safetensors.index.json) and config.json of a Hugging Face folder

SHARD_A, SHARD_B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
SEED_INDEX = {"metadata": {"total_size": 112},
              "weight_map": {"model.embed_tokens.weight": SHARD_A, "model.norm.weight": SHARD_A, "lm_head.weight": SHARD_B}}
SEED_CONFIG = {"model_type": "llama", "hidden_size": 4, "vocab_size": 6}
SHARD_NAMES = [SHARD_A, SHARD_B, "../" + SHARD_A, "/tmp/" + SHARD_A, "sub/" + SHARD_A, "missing.safetensors", "pytorch_model.bin",
               "model.bin", ".safetensors", "config.json", SHARD_A + "\x00", "\\" + SHARD_A, "~/" + SHARD_A, SHARD_A.upper()]


def _setup_index(folder: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.ones(6, 4), "model.norm.weight": torch.ones(4)}, str(folder / SHARD_A))
    save_file({"lm_head.weight": torch.ones(6, 4)}, str(folder / SHARD_B))
    return folder


@st.composite
def index_folders(draw: Any) -> tuple[str, bytes, bytes]:
    """(what changed, index bytes, config.json bytes): a structurally mutated index (shard
    names outside the folder, non-string values, non-dict weight_map), raw byte edits of the
    index (invalid UTF-8, deep nesting), or a mutated config.json."""
    mode = draw(st.sampled_from(["index", "index", "index-bytes", "deep", "config"]))
    index = json.dumps(SEED_INDEX).encode()
    config = json.dumps(SEED_CONFIG).encode()
    if mode == "index":
        tree = apply_tree_edits(SEED_INDEX, draw(tree_edits(nasty(SHARD_NAMES), keys=["weight_map", "metadata", "x"])))
        index = json.dumps(tree, allow_nan=True).encode("utf-8", "surrogatepass")
    elif mode == "index-bytes":
        index = apply_byte_edits(index, draw(mutate_bytes()))
    elif mode == "deep":
        depth = draw(st.sampled_from([100, 2000, 100_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"weight_map":', "}")]))
        index = (opener * depth + "1" + closer * depth).encode()
    else:
        config = (json.dumps(apply_tree_edits(SEED_CONFIG, draw(tree_edits(nasty()))), allow_nan=True).encode("utf-8", "surrogatepass")
                  if draw(st.booleans()) else apply_byte_edits(config, draw(mutate_bytes())))
    return mode, index, config


def _read_index(folder: Path, example: tuple[str, bytes, bytes]) -> None:
    from sparsemerge.io.reader import index_shards
    from sparsemerge.io.sources import resolve_source
    from sparsemerge.io.tensors import open_tensor_source

    _, index, config = example
    (folder / "model.safetensors.index.json").write_bytes(index)
    (folder / "config.json").write_bytes(config)
    tolerate(lambda: index_shards(folder))
    tolerate(lambda: resolve_source(str(folder)))
    source = tolerate(lambda: open_tensor_source(str(folder)))
    if source is not None:
        with source:
            for name in source.names():
                source.shape(name), source.dtype(name)
                tolerate(lambda: source.get(name))
            tolerate(source.config)


INDEX = Reader(
    "index", setup=_setup_index, strategy=index_folders(), read=_read_index,
    doc="index_shards / resolve_source / open_tensor_source on a folder with a mutated shard index or config.json",
)

# ---------------------------------------------------------------------------------------------
# packed manifest (sparsemerge_packed.json) and compressed-tensors folders

PACK_VARIANTS = {  # the golden variants of tests/formats/test_formats_golden.py
    "nm-bits2": dict(metadata="bits2"),
    "nm-index": dict(metadata="index"),
    "nm-entropy": dict(metadata="entropy"),
    "nm-entropy-int4-g4-dense-int8": dict(metadata="entropy", quant="int4", group_size=4, dense_quant="int8"),
    "nm-index-int8-asym-channel": dict(metadata="index", quant="int8", group_size=0, symmetric=False),
    "nm-4of8-entropy": dict(pattern="4:8", metadata="entropy"),
    "bitmask-codebook4": dict(format="bitmask", codebook=4),
    "coo": dict(format="coo"),
    "csr": dict(format="csr"),
    "bsr-4": dict(format="bsr", block=4),
    "sparse-24-bitmask": dict(format="sparse-24-bitmask"),
}
MANIFEST_FILES = {"sparse-24-bitmask": ["config.json", "sparsemerge_checksums.json"]}  # default: the packed manifest
MANIFEST_VALUES = ["float32", "float16", "int4", "int8", "uint8", "nm", "bitmask", "coo", "csr", "bsr", "dense", "index",
                   "entropy", "bits2", "packed-00001-of-00001.safetensors", "model.layers.0.mlp.up_proj.weight:values",
                   [10**12, 10**12], [4, 16], [16, 4], [4, 8], [6], [-4, 16], [4, 16, 1], ["4", "16"], 2, 4, 8, 16, 2**62]


class PackedSeeds:
    def __init__(self, folder: Path, manifests: dict[tuple[str, str], Any]) -> None:
        self.folder = folder  # one folder per variant, the manifest rewritten per example
        self.manifests = manifests  # (variant, file) -> parsed JSON seed

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"PackedSeeds({str(self.folder)!r})"


def _tiny_source(folder: Path) -> Path:
    """A 2:4-sparse 4x16 weight (one all-zero group), a dense 6x4 embedding and a norm."""
    from safetensors.torch import save_file

    w = (torch.arange(64, dtype=torch.float32).reshape(4, 16) % 7 - 3) / 4 + 0.125
    groups = w.reshape(4, 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    w = torch.zeros_like(groups).scatter(-1, keep, groups.gather(-1, keep)).reshape(4, 16)
    w[1, 4:8] = 0.0
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"model.layers.0.mlp.up_proj.weight": w.contiguous(),
               "model.embed_tokens.weight": (torch.arange(24, dtype=torch.float32).reshape(6, 4) - 12) / 8,
               "model.norm.weight": torch.ones(4)}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "fuzz-test"}) + "\n")
    return folder


def _setup_packed(folder: Path) -> PackedSeeds:
    from sparsemerge.formats.model import MANIFEST_NAME, pack

    src = _tiny_source(folder / "src")
    manifests = {}
    for variant, options in PACK_VARIANTS.items():
        pack(src, folder / variant, **options)
        for name in MANIFEST_FILES.get(variant, [MANIFEST_NAME]):
            manifests[(variant, name)] = json.loads((folder / variant / name).read_text())
    return PackedSeeds(folder, manifests)


@st.composite
def manifest_edits(draw: Any) -> tuple[str, int, Any, bool, bool]:
    """(variant, which JSON file, edits, reseal, verify): structural edits of a packed
    checkpoint's manifest (or a compressed-tensors folder's config / checksums) with the
    digest recomputed after the edit (``reseal``: the deeper checks are reached) or not;
    ``verify``: tensors read with or without their checksums (``deploy`` reads without).
    Edits are either tree edits or byte edits of the JSON text."""
    variant = draw(st.sampled_from(sorted(PACK_VARIANTS)))
    which = draw(st.integers(0, 1))
    if draw(st.integers(0, 4)) == 0:
        edits: Any = ("bytes", draw(mutate_bytes()))
    else:
        edits = ("tree", draw(tree_edits(nasty(MANIFEST_VALUES), keys=["format", "shape", "dtype", "params", "fields", "shard", "codec", "x"])))
    return variant, which, edits, draw(st.booleans()), draw(st.booleans())


def _read_packed(seeds: PackedSeeds, example: tuple[str, int, Any, bool, bool]) -> None:
    from sparsemerge.formats.model import read_packed
    from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest

    variant, which, (kind, edits), reseal, verify = example
    names = [n for (v, n) in seeds.manifests if v == variant]
    name = names[which % len(names)]
    seed = seeds.manifests[(variant, name)]
    folder = seeds.folder / variant
    path = folder / name
    try:
        if kind == "bytes":
            path.write_bytes(apply_byte_edits(json.dumps(seed, indent=1).encode(), edits))
        else:
            tree = apply_tree_edits(seed, edits)
            if reseal and isinstance(tree, dict) and MANIFEST_DIGEST_KEY in seed:
                try:
                    tree[MANIFEST_DIGEST_KEY] = manifest_digest(tree)
                except ValueError:  # NaN: canonical JSON refuses it, the manifest stays unsealed
                    pass
            text = json.dumps(tree, allow_nan=True)
            note(f"{variant}/{name}: {text}")
            path.write_bytes(text.encode("utf-8", "surrogatepass"))
        packed = tolerate(lambda: read_packed(folder))
        if packed is None:
            return
        with packed:
            tolerate(packed.config)
            for tensor in list(packed.names()):
                tolerate(lambda: packed.get(tensor, verify=verify))
                tolerate(lambda: packed.get_dense(tensor, verify=verify))
                tolerate(lambda: packed.nbytes(tensor))
    finally:
        path.write_text(json.dumps(seed, indent=2) + "\n")  # the next example starts from the seed


PACKED = Reader(
    "manifest", setup=_setup_packed, strategy=manifest_edits(), read=_read_packed,
    doc="read_packed / names / get / get_dense / nbytes on packed folders (every format, codec) with an edited manifest",
)
