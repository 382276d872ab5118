"""Model-level packing on a tiny random Llama: pack / unpack / read_packed / inspect, and
every kind of bad input (truncated shard, flipped byte, manifest disagreeing with the
data, a tensor that is not N:M, existing output, interrupted writes)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sparsemerge.cli.main import main
from sparsemerge.errors import PatternViolation, SparsemergeError
from sparsemerge.formats import Bitmask, Dense, NMPacked, QuantizedValues
from sparsemerge.formats.model import MANIFEST_NAME, PackConfig, pack, read_packed, unpack


@pytest.fixture
def pruned_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    from conftest import make_tiny_llama

    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    model = make_tiny_llama()
    prune_(model, PruneConfig(pattern="2:4", progress=False))
    out = tmp_path / "pruned"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.mark.parametrize("metadata", ["bits2", "index", "entropy"])
def test_pack_unpack_is_bit_exact_and_transformers_loads_it(pruned_dir, tmp_path, metadata):
    from transformers import AutoModelForCausalLM

    report = pack(pruned_dir, tmp_path / "packed", metadata=metadata)
    assert len(report.packed) == 14 and not report.kept_dense
    packed = read_packed(tmp_path / "packed")
    obj = packed.get("model.layers.0.mlp.up_proj.weight")
    assert isinstance(obj, NMPacked) and obj.coding == metadata and (obj.n, obj.m) == (2, 4)
    assert isinstance(packed.get("model.norm.weight"), torch.Tensor)
    assert (tmp_path / "packed" / "tokenizer.json").is_file() and packed.config()["model_type"] == "llama"
    unpack(tmp_path / "packed", tmp_path / "dense")
    source, result = _state(pruned_dir), _state(tmp_path / "dense")
    assert source.keys() == result.keys()
    for name in source:
        assert result[name].dtype == source[name].dtype and torch.equal(result[name], source[name]), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, source["model.layers.1.self_attn.q_proj.weight"])


def test_int4_with_int8_dense_is_small_and_close(pruned_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    report = pack(pruned_dir, tmp_path / "q", quant="int4", group_size=32, dense_quant="int8")
    packed = read_packed(tmp_path / "q")
    up = packed.get("model.layers.0.mlp.up_proj.weight")
    assert isinstance(up.codec, QuantizedValues) and up.codec.bits == 4 and up.codec.group_size == 32
    assert up.codec.int8_codes().shape == up.values_float.shape
    emb = packed.get("model.embed_tokens.weight")
    assert isinstance(emb, Dense) and emb.codec.bits == 8
    dense_fp32 = 4 * report.numel
    assert report.nbytes < 0.2 * dense_fp32
    # the reported size is the shard's data section, read by a hand-written parser
    from layout_reference import read_safetensors

    stored = [raw for shard in sorted((tmp_path / "q").glob("*.safetensors")) for _, _, raw in read_safetensors(shard)[0].values()]
    assert report.nbytes == sum(len(raw) for raw in stored)
    unpack(tmp_path / "q", tmp_path / "qd")
    source, result = _state(pruned_dir), _state(tmp_path / "qd")
    w, w_hat = source["model.layers.0.mlp.up_proj.weight"], result["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(w_hat[w == 0], torch.zeros_like(w_hat[w == 0]))  # still 2:4
    assert (w_hat - w).abs().max() <= w.abs().max() / 7 / 2 * 1.001
    AutoModelForCausalLM.from_pretrained(tmp_path / "qd")


@pytest.mark.parametrize("fmt", ["bitmask", "coo", "csr", "bsr"])
def test_general_formats_pack_and_unpack_exactly(pruned_dir, tmp_path, fmt):
    pack(pruned_dir, tmp_path / fmt, format=fmt, block=8)
    unpack(tmp_path / fmt, tmp_path / f"{fmt}-dense")
    source, result = _state(pruned_dir), _state(tmp_path / f"{fmt}-dense")
    assert all(torch.equal(result[k], source[k]) for k in source)


def test_sharding_keeps_a_tensor_in_one_shard(pruned_dir, tmp_path):
    pack(pruned_dir, tmp_path / "sharded", shard_size=40_000)
    manifest = json.loads((tmp_path / "sharded" / MANIFEST_NAME).read_text())
    assert len(manifest["shards"]) > 2
    names = {n for names in manifest["shards"].values() for n in names}
    assert names == set(manifest["tensors"])
    # each shard holds whole tensors (all their fields) and stays within shard_size unless it
    # holds a single tensor larger than that; the files are read by a hand-written parser
    from layout_reference import read_safetensors

    for shard, members in manifest["shards"].items():
        stored, _ = read_safetensors(tmp_path / "sharded" / shard)
        assert set(stored) == {f["key"] for n in members for f in manifest["tensors"][n]["fields"].values()}, shard
        data = sum(len(raw) for _, _, raw in stored.values())
        assert data == sum(manifest["tensors"][n]["nbytes"] for n in members), shard
        assert data <= 40_000 or len(members) == 1, shard
    unpack(tmp_path / "sharded", tmp_path / "sd", shard_size=100_000)
    assert (tmp_path / "sd" / "model.safetensors.index.json").is_file()
    source, result = _state(pruned_dir), _state(tmp_path / "sd")
    assert all(torch.equal(result[k], source[k]) for k in source)


def test_a_dense_tensor_is_refused_for_nm_with_its_name(tiny_llama_dir, tmp_path):
    with pytest.raises(PatternViolation, match=r"tensor 'model\.layers\.0\.\S+\.weight'.*prune it first"):
        pack(tiny_llama_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary folder is gone too
    # a general format takes it
    pack(tiny_llama_dir, tmp_path / "bitmask", format="bitmask")
    assert isinstance(read_packed(tmp_path / "bitmask").get("model.layers.0.mlp.up_proj.weight"), Bitmask)


def test_existing_output_needs_overwrite(pruned_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SparsemergeError, match="already exists.*--overwrite"):
        pack(pruned_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").is_file()
    pack(pruned_dir, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file() and not (tmp_path / "out" / "keep.txt").exists()


@pytest.fixture
def packed_dir(pruned_dir, tmp_path) -> Path:
    pack(pruned_dir, tmp_path / "packed", quant="int8")
    return tmp_path / "packed"


def _shard_of(folder: Path, name: str) -> Path:
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    return folder / manifest["tensors"][name]["shard"]


def test_truncated_shard_is_refused_naming_the_shard_and_tensors(packed_dir, tmp_path):
    shard = _shard_of(packed_dir, "model.layers.0.mlp.up_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(SparsemergeError, match=r"shard 'packed-00001-of-00001.safetensors' is unreadable.*it holds model\."):
        read_packed(packed_dir).get("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(SparsemergeError):
        unpack(packed_dir, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_flipped_byte_fails_the_checksum_naming_the_tensor(packed_dir):
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_of(packed_dir, name)
    from sparsemerge.formats.shards import ShardReader

    header = ShardReader(packed_dir).header(shard.name)
    start, end = header[f"{name}:values.codes"]["data_offsets"]
    data = bytearray(shard.read_bytes())
    offset = 8 + int.from_bytes(data[:8], "little") + start + 5
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    packed = read_packed(packed_dir)
    with pytest.raises(SparsemergeError, match=rf"tensor '{name}': checksum mismatch"):
        packed.get(name)
    packed.get("model.layers.0.mlp.up_proj.weight")  # the others still read
    assert main(["inspect", str(packed_dir), "--verify"]) == 2


def test_flipped_metadata_byte_is_caught(pruned_dir, tmp_path):
    pack(pruned_dir, tmp_path / "p", metadata="index")
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = _shard_of(tmp_path / "p", name)
    from sparsemerge.formats.shards import ShardReader

    start, _ = ShardReader(tmp_path / "p").header(shard.name)[f"{name}:metadata"]["data_offsets"]
    data = bytearray(shard.read_bytes())
    data[8 + int.from_bytes(data[:8], "little") + start] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SparsemergeError, match=name.replace(".", r"\.")):
        read_packed(tmp_path / "p").get(name)
    # without the checksum the decoder's own validation still refuses corrupt indices
    # (0xFF turns 3-bit codes into 7 >= C(4,2) = 6)
    with pytest.raises(SparsemergeError, match=r"group index 7 >= C\(4,2\)=6"):
        read_packed(tmp_path / "p").get(name, verify=False)


def _write_resealed(path, manifest):
    """Write an edited manifest with a fresh manifest digest: what a careful forger (or a
    bug) would do, so that the per-tensor checks behind the digest are tested too."""
    from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest

    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_disagreeing_with_data_is_refused(packed_dir):
    path = packed_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    name = "model.layers.0.mlp.gate_proj.weight"
    manifest["tensors"][name]["shape"] = [128, 32]  # claims another shape
    _write_resealed(path, manifest)
    with pytest.raises(SparsemergeError, match=rf"tensor '{name}': checksum mismatch"):
        read_packed(packed_dir).get(name)
    manifest["tensors"][name]["shape"] = [128, 64]
    manifest["tensors"][name]["fields"]["values.scale"]["dtype"] = "float16"
    _write_resealed(path, manifest)
    with pytest.raises(SparsemergeError, match=rf"tensor '{name}': field 'values.scale'.*manifest does not match"):
        read_packed(packed_dir).get(name)
    path.write_text("{not json")
    with pytest.raises(SparsemergeError, match="not valid JSON"):
        read_packed(packed_dir)


def test_missing_shard_is_named(packed_dir):
    shard = _shard_of(packed_dir, "model.norm.weight")
    shard.unlink()
    with pytest.raises(SparsemergeError, match=r"shard 'packed-00001-of-00001.safetensors' is missing"):
        read_packed(packed_dir).get("model.norm.weight")


def test_pack_options_are_validated():
    with pytest.raises(Exception, match="N:M pattern"):
        PackConfig(pattern="unstructured:0.5")
    with pytest.raises(SparsemergeError, match="either --quant or --codebook"):
        PackConfig(quant="int4", codebook=16).codec()


def test_cli_pack_inspect_unpack(pruned_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["pack", str(pruned_dir), str(out), "--quant", "int4", "--group", "32", "--dense-quant", "int8", "--no-progress"]) == 0
    assert "packed 14 of 20 tensors as nm" in capsys.readouterr().out
    assert main(["pack", str(pruned_dir), str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["inspect", str(out), "--all"]) == 0
    text = capsys.readouterr().out
    assert "nm 2:4 entropy+int4" in text and "dense+int8" in text and "total: 20 tensors" in text
    assert main(["unpack", str(out), str(tmp_path / "cli-dense"), "--no-progress"]) == 0
    assert main(["inspect", str(tmp_path / "cli-dense")]) == 0
    assert "dense float32" in capsys.readouterr().out
    assert main(["pack", str(pruned_dir), str(tmp_path / "x"), "--metadata", "bogus"]) == 2
    assert "invalid pack options" in capsys.readouterr().err


def test_float16_storage_restores_the_source_dtype(pruned_dir, tmp_path):
    report = pack(pruned_dir, tmp_path / "h", dtype="float16")
    packed = read_packed(tmp_path / "h")
    obj = packed.get("model.layers.0.mlp.up_proj.weight")
    assert obj.values.dtype == torch.float16
    assert report.nbytes < 0.7 * 2 * report.numel  # fp16 halves + entropy metadata, dense rest in fp16
    source = _state(pruned_dir)
    w = packed.get_dense("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.float32
    assert torch.equal(w, source["model.layers.0.mlp.up_proj.weight"].half().float())


def test_bare_safetensors_source_copies_only_model_files(pruned_dir, tmp_path):
    folder = tmp_path / "loose"
    folder.mkdir()
    shutil.copy(pruned_dir / "model.safetensors", folder / "weights.safetensors")
    shutil.copy(pruned_dir / "config.json", folder / "config.json")
    (folder / "notes.txt").write_text("unrelated")
    pack(folder / "weights.safetensors", tmp_path / "out")
    copied = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".safetensors"))
    assert copied == ["config.json", MANIFEST_NAME]


def test_dense_format_takes_the_quant_option_for_targeted_weights(pruned_dir, tmp_path):
    pack(pruned_dir, tmp_path / "d", format="dense", quant="int8")
    packed = read_packed(tmp_path / "d")
    up = packed.get("model.layers.0.mlp.up_proj.weight")
    assert isinstance(up, Dense) and up.codec.bits == 8
    assert isinstance(packed.get("model.embed_tokens.weight"), torch.Tensor)


def test_manifest_cannot_point_outside_the_folder(packed_dir):
    path = packed_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["tensors"]["model.norm.weight"]["shard"] = "../pruned/model.safetensors"
    _write_resealed(path, manifest)
    with pytest.raises(SparsemergeError, match="not a file name inside"):
        read_packed(packed_dir).get("model.norm.weight")


@pytest.mark.parametrize("metadata", ["bits2", "index", "entropy"])
def test_random_corruption_raises_clean_errors_only(pruned_dir, tmp_path, metadata):
    """Flip bytes anywhere in the shard and read with and without checksums: every read
    either succeeds or raises SparsemergeError (the numba decoders never see unchecked sizes)."""
    import random

    pack(pruned_dir, tmp_path / "p", metadata=metadata, quant="int4", group_size=16)
    shard = _shard_of(tmp_path / "p", "model.norm.weight")
    clean = shard.read_bytes()
    rng = random.Random(metadata)
    outcomes = set()
    for _ in range(12):
        data = bytearray(clean)
        for _ in range(3):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        for verify in (True, False):
            try:
                packed = read_packed(tmp_path / "p")
                for name in packed.names():
                    packed.get_dense(name, verify=verify)
                outcomes.add("ok")
            except SparsemergeError:
                outcomes.add("error")
    assert "error" in outcomes
