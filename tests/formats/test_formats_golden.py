"""Byte-exact golden files for the on-disk layout (tests/formats/golden/<variant>/).

A tiny deterministic checkpoint is packed in every format and codec; the shard bytes and
the manifest's ``tensors`` table must equal the committed files. A change here is a change
of the file format: regenerate deliberately with
``SPARSEMERGE_REGEN_GOLDEN=1 .venv/bin/pytest tests/formats/test_formats_golden.py`` and bump
the layout version when old files no longer read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.layout import CT_CHECKSUMS_NAME
from sparsemerge.formats.model import MANIFEST_NAME, pack, read_packed
from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_V1 = Path(__file__).parent / "golden-v1"  # layout version 1 (before 2026-12), kept to prove it still reads
REGEN = os.environ.get("SPARSEMERGE_REGEN_GOLDEN") == "1"

VARIANTS = {
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


def golden_source(folder: Path) -> Path:
    """4x16 2:4 weight (one empty group, one group with a single nonzero), a dense 6x4
    embedding and a norm; all values exact in float32."""
    from safetensors.torch import save_file

    rows, cols = 4, 16
    i = torch.arange(rows).reshape(-1, 1)
    j = torch.arange(cols).reshape(1, -1)
    w = (((i * 7 + j * 3) % 11) - 5).to(torch.float32) / 4
    w[w == 0] = 0.125
    combos = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(cols // 4):
            for p in combos[(r * 4 + g) % 6]:
                mask[r, g * 4 + p] = True
    w = w * mask
    w[1, 4:8] = 0.0  # an empty group
    w[2, 8:12] = torch.tensor([0.0, 0.0, 0.0, -1.5])  # one nonzero
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": w.contiguous(),
            "model.embed_tokens.weight": (torch.arange(24, dtype=torch.float32).reshape(6, 4) - 12) / 8,
            "model.norm.weight": torch.ones(4),
        },
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "golden-test"}) + "\n")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _layout_json(folder: Path) -> dict:
    manifest_path = folder / MANIFEST_NAME
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        return {"tensors": manifest["tensors"], "shards": manifest["shards"], "totals": manifest["totals"]}
    config = json.loads((folder / "config.json").read_text())
    return {"quantization_config": config["quantization_config"], "checksums": json.loads((folder / CT_CHECKSUMS_NAME).read_text())}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_on_disk_layout_is_byte_exact(tmp_path, variant):
    src = golden_source(tmp_path / "src")
    out = tmp_path / variant
    pack(src, out, **VARIANTS[variant])
    expected_dir = GOLDEN / variant
    if REGEN:
        shutil.rmtree(expected_dir, ignore_errors=True)
        expected_dir.mkdir(parents=True)
        for path in _weight_files(out):
            shutil.copy(path, expected_dir / path.name)
        (expected_dir / "layout.json").write_text(json.dumps(_layout_json(out), indent=1, sort_keys=True) + "\n")
    assert expected_dir.is_dir(), f"golden files for {variant} missing; regenerate (see module docstring)"
    got = {p.name: p.read_bytes() for p in _weight_files(out)}
    want = {p.name: p.read_bytes() for p in _weight_files(expected_dir)}
    assert got.keys() == want.keys()
    for name in got:
        assert got[name] == want[name], f"{variant}/{name} differs from the golden bytes"
    assert _layout_json(out) == json.loads((expected_dir / "layout.json").read_text())


def _rebuild(golden: Path, folder: Path, version: int) -> None:
    """A readable folder from committed golden files: the manifest (or config.json) rebuilt
    around the committed tensor table, as pack writes it for ``version``."""
    shutil.copytree(golden, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "golden-test"}))
    layout = json.loads((folder / "layout.json").read_text())
    if "tensors" in layout:
        manifest = {"layout": "sparsemerge-packed", "version": version, "options": {}, "source": {}, "files": [], **layout}
        if version >= 2:
            manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    else:
        (folder / "config.json").write_text(json.dumps({"model_type": "golden-test", "quantization_config": layout["quantization_config"]}))
        (folder / CT_CHECKSUMS_NAME).write_text(json.dumps(layout["checksums"]))


def _assert_decodes_to_source(packed, source, variant):
    lossy = any(k in variant for k in ("int", "codebook"))
    for name, tensor in source.items():
        decoded = packed.get_dense(name)  # verify=True: every digest of the golden files holds
        if lossy:
            tolerance = 0.75 if "codebook4" in variant else 0.2  # 3 free centroids for ~30 values
            assert torch.allclose(decoded, tensor, atol=tolerance), name
            assert torch.equal(decoded[tensor == 0], tensor[tensor == 0]), name
        else:
            assert torch.equal(decoded, tensor), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden_files_still_read(tmp_path, variant):
    """The committed files decode to the source (exactly without a codec), all checks full."""
    from safetensors.torch import load_file

    source = load_file(str(golden_source(tmp_path / "src") / "model.safetensors"))
    _rebuild(GOLDEN / variant, tmp_path / "golden", version=2)
    packed = read_packed(tmp_path / "golden")
    assert packed.checks.startswith("full:")
    _assert_decodes_to_source(packed, source, variant)


def test_version_1_files_still_read_with_data_checks(tmp_path):
    """Layout version 1 manifests (no entry digests) still read; their bytes are verified and
    ``checks`` says the entries are not covered. Labelling one version 2 is refused."""
    from safetensors.torch import load_file

    source = load_file(str(golden_source(tmp_path / "src") / "model.safetensors"))
    _rebuild(GOLDEN_V1 / "nm-entropy", tmp_path / "v1", version=1)
    packed = read_packed(tmp_path / "v1")
    assert packed.version == 1 and packed.checks.startswith("data only")
    _assert_decodes_to_source(packed, source, "nm-entropy")
    _rebuild(GOLDEN_V1 / "nm-entropy", tmp_path / "as-v2", version=2)  # v1 digests under a v2 label
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(SparsemergeError, match=rf"tensor '{name}': checksum mismatch"):
        read_packed(tmp_path / "as-v2").get(name)
    manifest = json.loads((tmp_path / "v1" / MANIFEST_NAME).read_text())
    manifest["version"] = 3
    (tmp_path / "v1" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SparsemergeError, match="layout version 3; this sparsemerge reads versions 1, 2"):
        read_packed(tmp_path / "v1")
