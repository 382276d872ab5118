"""The crashes the fuzzers of test_io_fuzz.py found, kept as plain tests; the harness's own
checks (a foreign exception, a hang, a huge allocation each fail an example); and the seeds
every fuzzer starts from, which must read cleanly (or the fuzzing would only scratch the
first check). A crash found but not yet fixed would be an ``xfail(strict=True)`` here with a
matching ``KNOWN_UNFIXED`` entry in fuzz_testlib (none are open)."""
from __future__ import annotations

import json
import struct
import time

import pytest
import torch

from fuzz_readers_files import INDEX, PACKED, PACK_VARIANTS, SAFETENSORS, SEED_DATA, SEED_HEADER, encode_safetensors
from fuzz_readers_gguf import GGUF, seed_spec, write_gguf
from fuzz_readers_yaml import SEEDS, YAML
from fuzz_testlib import MEMORY_HEADROOM, Reader, allocation_failure, guarded, run_example
from sparsemerge.errors import SparsemergeError
from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest
from sparsemerge.io.reader import SafetensorsFile, ShardReader, index_shards
from sparsemerge.io.tensors import open_tensor_source

# ---------------------------------------------------------------------------------------------
# the harness


def _reader(read) -> Reader:
    return Reader("probe", setup=lambda folder: folder, strategy=None, read=read)


def test_an_exception_other_than_ours_fails_the_example():
    with pytest.raises(KeyError):
        run_example(_reader(lambda ctx, ex: {}["missing"]), None, None)
    assert run_example(_reader(lambda ctx, ex: None), None, None) == "ok"
    with pytest.raises(SparsemergeError):  # raised by the reader itself, not by a project call: still "error"
        raise SparsemergeError("x")


def _spin_and_swallow(ctx, example):
    try:
        while True:
            pass
    except Exception:  # the project's "except Exception" must not hide the alarm
        raise SparsemergeError("swallowed")


def test_a_hang_fails_the_example_even_through_except_exception():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="hang"):
        run_example(_reader(_spin_and_swallow), None, None, limit=0.5)
    assert time.monotonic() - start < 5


def _wrap_allocation(ctx, example):
    try:
        torch.empty(MEMORY_HEADROOM * 4, dtype=torch.uint8)
    except RuntimeError as exc:
        raise SparsemergeError("could not read it") from exc


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="the memory cap needs Linux")
def test_a_huge_allocation_fails_the_example_even_when_reported_as_ours():
    with pytest.raises(RuntimeError, match="allocate"):
        run_example(_reader(lambda ctx, ex: torch.empty(MEMORY_HEADROOM * 4, dtype=torch.uint8)), None, None)
    with pytest.raises(AssertionError, match="huge allocation"):
        run_example(_reader(_wrap_allocation), None, None)


# ---------------------------------------------------------------------------------------------
# the seeds read cleanly


def test_safetensors_seed_reads(tmp_path):
    assert run_example(SAFETENSORS, tmp_path, encode_safetensors(SEED_HEADER, SEED_DATA)) == "ok"


def test_index_seed_reads(tmp_path):
    import fuzz_readers_files as f

    ctx = INDEX.setup(tmp_path)
    assert run_example(INDEX, ctx, ("index", json.dumps(f.SEED_INDEX).encode(), json.dumps(f.SEED_CONFIG).encode())) == "ok"
    assert len(open_tensor_source(str(tmp_path)).names()) == 3


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return PACKED.setup(tmp_path_factory.mktemp("packed"))


@pytest.mark.parametrize("variant", sorted(PACK_VARIANTS))
def test_every_packed_seed_reads(packed, variant):
    for which in (0, 1):
        assert run_example(PACKED, packed, (variant, which, ("tree", []), True, True)) == "ok"


@pytest.mark.parametrize("index", range(len(SEEDS)), ids=[s[0] for s in SEEDS])
def test_every_yaml_seed_loads(tmp_path, index):
    assert run_example(YAML, tmp_path, (index, "tree", [])) == "ok"


@pytest.fixture(scope="module")
def gguf_seeds(tmp_path_factory):
    return GGUF.setup(tmp_path_factory.mktemp("gguf"))


def test_gguf_seed_converts(gguf_seeds):
    assert run_example(GGUF, gguf_seeds, ("spec", [])) == "ok"


# ---------------------------------------------------------------------------------------------
# safetensors header (sparsemerge/io/reader.py)


def _st(tmp_path, header, data=b""):
    path = tmp_path / "x.safetensors"
    path.write_bytes(encode_safetensors(header, data))
    return path


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**31, 2**32], [2**31, 2**62, 0]])
def test_a_zero_size_tensor_whose_dims_overflow_int64_is_refused_at_open(tmp_path, shape):
    # was: TypeError "Overflow when unpacking long long" / RuntimeError "Stride calculation overflowed" in get()
    path = _st(tmp_path, {"t": {"dtype": "BF16", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(SparsemergeError, match="too large|invalid shape"):
        SafetensorsFile(path)


def test_a_zero_size_tensor_with_large_dims_still_reads(tmp_path):
    path = _st(tmp_path, {"t": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}})
    with SafetensorsFile(path) as f:
        assert f.get("t").shape == (0, 2**40)


def test_a_manifest_key_that_is_not_a_string_is_our_error(tmp_path):
    # was: TypeError "unhashable type: 'list'" from ShardReader.get (a packed manifest's field key: [])
    _st(tmp_path, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    reader = ShardReader(tmp_path, holders={"x.safetensors": [1, None]})
    with pytest.raises(SparsemergeError, match="not in"):
        reader.get("x.safetensors", [], "tensor 'w'")
    with pytest.raises(SparsemergeError, match="not a file name"):
        reader.open(["x.safetensors"])
    with pytest.raises(SparsemergeError, match="missing"):  # holders of odd types are shown, not a TypeError
        reader.open("y.safetensors")


# ---------------------------------------------------------------------------------------------
# shard index and config.json (sparsemerge/io/reader.py, sparsemerge/io/tensors.py)


@pytest.mark.parametrize("value", [["model.safetensors"], {"a": 1}])
def test_an_index_value_that_is_a_list_or_a_mapping_is_refused(tmp_path, value):
    # was: TypeError "unhashable type" from set(weight_map.values())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": value}}))
    with pytest.raises(SparsemergeError, match="shards must be .safetensors files"):
        index_shards(tmp_path)


def test_an_index_nested_thousands_deep_is_refused(tmp_path):
    # was: RecursionError from json.loads
    (tmp_path / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SparsemergeError, match="corrupt shard index"):
        index_shards(tmp_path)


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\xff"])
def test_a_corrupt_config_json_is_our_error(tmp_path, text):
    # was: json.JSONDecodeError from TensorSource.config()
    ctx = INDEX.setup(tmp_path)
    (ctx / "config.json").write_bytes(text.encode("latin-1"))
    with open_tensor_source(str(ctx)) as source:
        with pytest.raises(SparsemergeError, match="config.json"):
            source.config()


# ---------------------------------------------------------------------------------------------
# YAML recipes (sparsemerge/io/yaml_config.py, merge/config.py, merge/moe/config.py, cli/prune.py)


def _load(kind, tmp_path, text: "str | bytes") -> None:
    """Load with the fuzzer's loader for ``kind`` (the load, then the accessors)."""
    loader = {s[0]: s[2] for s in SEEDS}[kind]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    loader(path)


MERGE = "merge_method: linear\nmodels: [{model: a}, {model: b}]\n"


@pytest.mark.parametrize("kind", ["merge-ties", "prune"])
@pytest.mark.parametrize("text, was", [
    (b"\x80" + MERGE.encode(), "UnicodeDecodeError"),
    (MERGE + "seed: 2001-02-30\n", "ValueError: day is out of range"),
    (MERGE + "seed: !!timestamp 2001-13-01\n", "AttributeError from PyYAML's timestamp constructor"),
    (MERGE + "seed: " + "[" * 5000 + "]" * 5000 + "\n", "RecursionError"),
    (MERGE + "seed: 1" + "0" * 5000 + "\n", "ValueError: exceeds the limit for integer string conversion"),
])
def test_yaml_the_loader_chokes_on_is_our_error(tmp_path, kind, text, was):
    with pytest.raises(SparsemergeError, match="not UTF-8|not valid YAML"):
        _load(kind, tmp_path, text)


def test_a_recipe_with_integer_keys_is_our_error(tmp_path):
    # was: TypeError "keywords must be strings" from model(**data)
    with pytest.raises(SparsemergeError, match="invalid merge config"):
        _load("merge-ties", tmp_path, MERGE + "1: 2\n")


@pytest.mark.parametrize("size", ["1e999", "'1..2GB'", "0", "-5"])
@pytest.mark.parametrize("kind", ["merge-ties", "moe-mixtral"])
def test_a_bad_shard_size_is_refused_at_load(tmp_path, size, kind):
    # was: OverflowError / ValueError from parse_size, only when the merge wrote its output
    text = MERGE if kind.startswith("merge") else (
        "base_model: b\ngate_mode: random\nexperts: [{source_model: a}, {source_model: c}]\n")
    with pytest.raises(SparsemergeError, match="shard_size"):
        _load(kind, tmp_path, text + f"shard_size: {size}\n")


BOMB = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefg", "bcdefgh")) + "}"


@pytest.mark.parametrize("prune, was", [(BOMB, "a hang: recipe.key() serialized 10**8 values"),
                                        ("&p {w: *p}", "ValueError: Circular reference detected from recipe.key()")])
def test_a_recipe_whose_aliases_expand_without_bound_is_refused_at_load(tmp_path, prune, was):
    start = time.monotonic()
    with pytest.raises(SparsemergeError, match="expands to more than"):
        _load("train", tmp_path, f"model: m\nstages: [{{method: prune, prune: {prune}}}]\n")
    assert time.monotonic() - start < 5


def test_aliases_that_expand_moderately_still_load(tmp_path):
    from sparsemerge.train.recipe import load_recipe

    (tmp_path / "r.yaml").write_text("model: m\nstages:\n- &s {method: fixed, steps: 3}\n- *s\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    assert [s.steps for s in recipe.stages] == [3, 3]


# ---------------------------------------------------------------------------------------------
# GGUF (sparsemerge/io/gguf_header.py, sparsemerge/io/sources.py)


def _gguf(gguf_seeds, edit_kvs=None, edit_tensors=None):
    kvs, tensors = seed_spec()
    kvs = edit_kvs(kvs) if edit_kvs else kvs
    tensors = [(n, s, None) for n, s in tensors]
    tensors = edit_tensors(tensors) if edit_tensors else tensors
    path = gguf_seeds.folder / "case.gguf"
    write_gguf(path, kvs, tensors)
    return path


def _convert(gguf_seeds, path, monkeypatch):
    """open_tensor_source under the time bound and memory cap (the old code hung, or grew
    without bound, on these files)."""
    monkeypatch.setenv("SPARSEMERGE_CACHE", str(gguf_seeds.folder / "cache-case"))

    def names():
        with open_tensor_source(str(path)) as source:
            return source.names()

    return guarded(names, what=str(path))


def _set(key, value, kind="u32"):
    return lambda kvs: [kv for kv in kvs if kv[0] != key] + [(key, value, kind)]


def test_a_corrupt_gguf_array_count_is_named(gguf_seeds, monkeypatch):
    # before: our error too, but "unpack_from requires a buffer of at least 4398046514214 bytes" from
    # transformers' reader; the gguf package's reader (older transformers) loops over the count
    import gguf

    reader = gguf.GGUFReader(gguf_seeds.seed)
    count = reader.fields["tokenizer.ggml.token_type"].parts[4]  # [key length, key, type, item type, count, ...]
    at = count.ctypes.data - reader.data.ctypes.data
    data = bytearray(gguf_seeds.bytes)
    data[at : at + 8] = struct.pack("<Q", 2**40)
    path = gguf_seeds.folder / "case.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(SparsemergeError, match=r"could not read GGUF file .*corrupt.*tokenizer.ggml.token_type"):
        _convert(gguf_seeds, path, monkeypatch)


@pytest.mark.parametrize("blocks", [3, 2**20])
def test_a_gguf_block_count_beyond_its_tensors_is_refused(gguf_seeds, monkeypatch, blocks):
    # was: 3 - loaded "fine" with blocks 1 and 2 random; 2**20 - a hang building a million layers
    with pytest.raises(SparsemergeError, match=f"declares {blocks} blocks"):
        _convert(gguf_seeds, _gguf(gguf_seeds, _set("llama.block_count", blocks)), monkeypatch)


@pytest.mark.parametrize("edit, was", [
    (_set("llama.embedding_length", 2**16), "transformers allocated 32 GB for the blocks' missing weights (MemoryError under the cap)"),
    (_set("llama.feed_forward_length", 2**28), "an allocation of 25 GB for the MLP weights (MemoryError under the cap)"),
    (lambda kvs: [kv for kv in kvs if kv[0] != "llama.block_count"], "Llama's default 32 blocks, 31 of them random: 'ok' after ~8 s"),
], ids=["hidden-2**16", "ffn-2**28", "no-block-count"])
def test_gguf_metadata_describing_more_than_the_tensors_is_refused_before_allocating(gguf_seeds, monkeypatch, edit, was):
    with pytest.raises(SparsemergeError, match="describes a model of") as caught:
        _convert(gguf_seeds, _gguf(gguf_seeds, edit), monkeypatch)
    assert allocation_failure(caught.value) is None


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen2"])
def test_a_gguf_whose_architecture_does_not_match_its_tensors_is_refused(gguf_seeds, monkeypatch, arch):
    # was: loaded "fine", the missing weights random
    with pytest.raises(SparsemergeError, match="describes a model of|lacks weights"):
        _convert(gguf_seeds, _gguf(gguf_seeds, _set("general.architecture", arch, "str")), monkeypatch)


def test_a_gguf_missing_a_weight_is_refused_not_filled_with_random_numbers(gguf_seeds, monkeypatch):
    # was: loaded "fine" with mlp.up_proj random (transformers only logs MISSING)
    rename = lambda ts: [(n.replace("ffn_up", "ffn_upx"), s, r) for n, s, r in ts]  # noqa: E731
    with pytest.raises(SparsemergeError, match=r"lacks weights.*up_proj"):
        _convert(gguf_seeds, _gguf(gguf_seeds, edit_tensors=rename), monkeypatch)


def test_a_truncated_gguf_is_refused_by_the_header_walk(gguf_seeds):
    from sparsemerge.io.gguf_header import read_gguf_header

    header = read_gguf_header(gguf_seeds.seed)
    assert len(header.tensors) == 11 and header.metadata["general.architecture"] == "llama"
    path = gguf_seeds.folder / "cut.gguf"
    for cut in (10, 30, 200, len(gguf_seeds.bytes) - 1):
        path.write_bytes(gguf_seeds.bytes[:cut])
        with pytest.raises(SparsemergeError, match="could not read GGUF file .* corrupt"):
            read_gguf_header(path)


@pytest.mark.slow
def test_the_bundled_gguf_passes_every_check():
    from transformers import AutoConfig

    from sparsemerge.io.gguf_header import check_gguf_model, read_gguf_header
    from sparsemerge.io.sources import _check_gguf_model_size, bundled_model_path

    path = bundled_model_path()
    header = read_gguf_header(path)
    assert check_gguf_model(path, header) == "llama" and len(header.tensors) == 272
    _check_gguf_model_size(path, AutoConfig.from_pretrained(path.parent, gguf_file=path.name), header.numel())


# ---------------------------------------------------------------------------------------------
# packed manifests (sparsemerge/formats/base.py)


def _edit_manifest(packed, variant, edit, name="sparsemerge_packed.json", reseal=True):
    seed = packed.manifests[(variant, name)]
    tree = json.loads(json.dumps(seed))
    edit(tree)
    if reseal and MANIFEST_DIGEST_KEY in tree:
        tree[MANIFEST_DIGEST_KEY] = manifest_digest(tree)
    (packed.folder / variant / name).write_text(json.dumps(tree, allow_nan=True))
    return packed.folder / variant


@pytest.fixture
def restore(packed):
    yield
    for (variant, name), seed in packed.manifests.items():
        (packed.folder / variant / name).write_text(json.dumps(seed, indent=2) + "\n")


W = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("variant", ["nm-4of8-entropy", "bitmask-codebook4", "coo", "csr", "bsr-4"])
def test_a_manifest_entry_with_a_one_dimensional_shape_is_our_error(packed, restore, variant):
    # was: ValueError "not enough values to unpack" from rows, cols = shape (entry resealed, read without verify)
    from sparsemerge.formats.model import read_packed

    folder = _edit_manifest(packed, variant, lambda m: m["tensors"][W].__setitem__("shape", [4]))
    with read_packed(folder) as ckpt:
        for verify in (False, True):
            with pytest.raises(SparsemergeError, match="2-D weights|checksum"):
                ckpt.get_dense(W, verify=verify)


# ---------------------------------------------------------------------------------------------
# packed manifests: crashes the fuzzer found in sparsemerge/formats/reader.py and formats/ct.py


def test_a_manifest_entry_whose_fields_are_null(packed, restore):
    from sparsemerge.formats.model import read_packed

    folder = _edit_manifest(packed, "nm-index", lambda m: m["tensors"][W].__setitem__("fields", None))
    with read_packed(folder) as ckpt, pytest.raises(SparsemergeError, match="manifest entry is malformed"):
        ckpt.get(W, verify=False)


@pytest.mark.parametrize("value", [None, "", "drop"])
def test_a_manifest_entry_with_a_bad_nbytes(packed, restore, value):
    from sparsemerge.formats.model import read_packed

    def edit(m):
        if value == "drop":
            del m["tensors"][W]["nbytes"]
        else:
            m["tensors"][W]["nbytes"] = value

    with read_packed(_edit_manifest(packed, "coo", edit)) as ckpt, pytest.raises(SparsemergeError, match="no valid 'nbytes'"):
        ckpt.nbytes(W)


def test_a_compressed_tensors_folder_whose_config_is_null(packed, restore):
    from sparsemerge.formats.model import read_packed

    folder = packed.folder / "sparse-24-bitmask"
    (folder / "config.json").write_text("null")
    with pytest.raises(SparsemergeError, match="is not a packed checkpoint"):
        read_packed(folder)


def test_a_compressed_tensors_config_holding_nan(packed, restore):
    from sparsemerge.formats.model import read_packed

    folder = _edit_manifest(packed, "sparse-24-bitmask",
                            lambda c: c["quantization_config"].__setitem__("version", float("nan")), name="config.json")
    with pytest.raises(SparsemergeError, match="quantization_config .* it was edited"):
        read_packed(folder)
