"""The packed manifest is covered by checksums (layout version 2, issue 17 item 5): editing any
entry - a dtype, a shape, a codec parameter, a tensor's name, the options - deleting or
swapping entries, is refused with a clear error before a wrong tensor is used; and the
compressed-tensors folders we write carry a checksums file with the same reach."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.layout import CT_CHECKSUMS_NAME
from sparsemerge.formats.model import MANIFEST_NAME, pack, read_packed
from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest

UP = "model.layers.0.mlp.up_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
EDITED = "the manifest was edited or is corrupt"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from sparsemerge.masks import nm_mask

    folder = tmp_path_factory.mktemp("src")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name in (UP, GATE):
        w = torch.randn(8, 16, generator=g)
        tensors[name] = w * nm_mask(w.abs(), 2, 4)
    tensors["model.norm.weight"] = torch.ones(16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture
def packed(source, tmp_path) -> Path:
    pack(source, tmp_path / "p", quant="int8", group_size=8)
    return tmp_path / "p"


def _edit(folder: Path, change, reseal: bool = False) -> None:
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:  # a forger who recomputes the manifest digest still meets the per-tensor digests
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def test_a_fresh_pack_reads_with_full_checks_and_reindenting_changes_nothing(packed, source):
    from safetensors.torch import load_file

    _edit(packed, lambda m: None)  # rewritten with another indent: the canonical form is the same
    with read_packed(packed) as ckpt:
        assert ckpt.version == 2 and ckpt.checks.startswith("full:")
        want = load_file(str(source / "model.safetensors"))
        assert torch.equal(ckpt.get_dense("model.norm.weight"), want["model.norm.weight"])
        assert torch.allclose(ckpt.get_dense(UP), want[UP], atol=0.05)


def _set_dtype(m):
    m["tensors"][UP]["dtype"] = "float16"


def _delete_entry(m):
    del m["tensors"][GATE]
    for names in m["shards"].values():
        names.remove(GATE) if GATE in names else None


def _rename(m):  # one byte of a tensor's name, in both tables
    new = UP.replace("up_proj", "up_prok")
    m["tensors"][new] = m["tensors"].pop(UP)
    for names in m["shards"].values():
        names[:] = [new if n == UP else n for n in names]


def _swap(m):
    m["tensors"][UP], m["tensors"][GATE] = m["tensors"][GATE], m["tensors"][UP]


def _options(m):
    m["options"]["quant"] = "int4"


def _group_size(m):
    m["tensors"][UP]["params"]["codec"]["group_size"] = 4


@pytest.mark.parametrize("change", [_set_dtype, _delete_entry, _rename, _swap, _options, _group_size],
                         ids=["dtype", "delete", "rename", "swap", "options", "codec-param"])
def test_any_manifest_edit_is_refused_at_open(packed, change):
    _edit(packed, change)
    with pytest.raises(SparsemergeError, match=f"does not match its manifest_sha256: {EDITED}"):
        read_packed(packed)


@pytest.mark.parametrize("change", [_set_dtype, _rename, _swap, _group_size], ids=["dtype", "rename", "swap", "codec-param"])
def test_a_resealed_manifest_still_fails_on_the_edited_tensor(packed, change):
    _edit(packed, change, reseal=True)
    ckpt = read_packed(packed)
    bad = [name for name in ckpt.names() if _fails(ckpt, name)]
    assert bad and set(bad) <= {UP, GATE, UP.replace("up_proj", "up_prok")}
    assert "model.norm.weight" not in bad


def _fails(ckpt, name: str) -> bool:
    try:
        ckpt.get(name)
    except SparsemergeError as exc:
        assert "checksum mismatch" in str(exc) and repr(name) in str(exc)
        return True
    return False


def test_a_removed_manifest_digest_is_refused(packed):
    _edit(packed, lambda m: m.pop(MANIFEST_DIGEST_KEY))
    with pytest.raises(SparsemergeError, match=f"has no manifest_sha256: {EDITED}"):
        read_packed(packed)


def test_inspect_verify_says_what_it_checked(packed, capsys):
    assert main(["inspect", str(packed), "--verify"]) == 0
    assert "verified 3 tensors - checks: full:" in capsys.readouterr().out
    _edit(packed, _set_dtype)
    assert main(["inspect", str(packed), "--verify"]) == 2
    assert EDITED in capsys.readouterr().err


# ---- compressed-tensors folders -------------------------------------------------------------


@pytest.fixture
def ct_folder(source, tmp_path) -> Path:
    pack(source, tmp_path / "ct", format="sparse-24-bitmask")
    return tmp_path / "ct"


def _flip_data_byte(folder: Path, key: str) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start = json.loads(data[8 : 8 + size])[key]["data_offsets"][0]
    data[8 + size + start] ^= 0x40
    path.write_bytes(bytes(data))


def test_ct_folder_carries_checksums_that_catch_a_flipped_value(ct_folder, capsys):
    with read_packed(ct_folder) as ckpt:
        assert ckpt.checks.startswith("full:")
        ckpt.get(UP)
    _flip_data_byte(ct_folder, UP.replace(".weight", ".compressed"))
    with pytest.raises(SparsemergeError, match=r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight': checksum mismatch"):
        read_packed(ct_folder).get(UP)
    read_packed(ct_folder).get(UP, verify=False)  # still a valid 2:4 structure: only the digest knows
    assert main(["inspect", str(ct_folder), "--verify"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_ct_folder_edited_config_or_checksums_is_refused(ct_folder):
    config_path = ct_folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["sparsity_config"]["ignore"].append("lm_head")
    config_path.write_text(json.dumps(config))
    with pytest.raises(SparsemergeError, match="quantization_config .* was edited"):
        read_packed(ct_folder)
    config["quantization_config"]["sparsity_config"]["ignore"].pop()
    config_path.write_text(json.dumps(config))
    read_packed(ct_folder)
    checksums = ct_folder / CT_CHECKSUMS_NAME
    body = json.loads(checksums.read_text())
    body["tensors"]["model.norm.weight"] = "0" * 64
    checksums.write_text(json.dumps(body))
    with pytest.raises(SparsemergeError, match="does not match its own sha256"):
        read_packed(ct_folder)


def test_ct_folder_without_our_checksums_reads_with_structure_checks(ct_folder, capsys):
    (ct_folder / CT_CHECKSUMS_NAME).unlink()  # as llm-compressor writes it
    with read_packed(ct_folder) as ckpt:
        assert ckpt.checks.startswith("structure only")
        ckpt.get(UP)
    assert main(["inspect", str(ct_folder), "--verify"]) == 0
    assert "checks: structure only" in capsys.readouterr().out


def test_unpack_and_repack_of_a_ct_folder_do_not_copy_its_checksums(ct_folder, tmp_path):
    from sparsemerge.formats.model import unpack

    unpack(ct_folder, tmp_path / "dense")
    assert not (tmp_path / "dense" / CT_CHECKSUMS_NAME).exists()
    pack(tmp_path / "dense", tmp_path / "again", format="sparse-24-bitmask")
    read_packed(tmp_path / "again").get(UP)  # its own, fresh checksums
