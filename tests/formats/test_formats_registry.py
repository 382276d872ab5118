"""A format is one module that registers itself: the CLI help, the flags, ``pack``, the reader
and the size plan all find it through the registry (issue 11, item 4)."""
from __future__ import annotations

import json
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import save_file

from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, FormatOption, SparseFormat, format_options, need, pack_formats
from sparsemerge.formats.model import PackConfig, pack, read_packed
from sparsemerge.formats.size import PlanRow, plan


class Tiled(SparseFormat):
    """A toy format for the test: the dense values, stored tile by tile of ``tile`` columns
    (``values`` ``(rows * cols / tile, tile)``); its option ``--tile`` must divide cols."""

    name = "tiled"
    help = "toy format of the registry test: dense values in tiles of --tile columns"
    options = (FormatOption("tile", 4, "tiled: columns per tile (default 4)", int),)
    plan_order = 35  # between bitmask (30) and bsr (40)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, tile: int, values: Any) -> None:
        self.shape, self.dtype, self.tile, self.values = (int(shape[0]), int(shape[1])), dtype, int(tile), values

    @classmethod
    def from_dense(cls, dense: torch.Tensor, tile: int = 4) -> "Tiled":
        if dense.shape[1] % tile:
            raise SparsemergeError(f"tiled: {tile} does not divide {dense.shape[1]} columns")
        return cls(tuple(dense.shape), dense.dtype, tile, dense.reshape(-1, tile).clone())

    @classmethod
    def pack_params(cls, shape: tuple[int, ...], config: Any) -> tuple[dict[str, Any], Optional[str]]:
        tile = int(config.option("tile"))
        if shape[1] % tile:
            return {}, f"{shape[1]} columns not divisible by tile {tile}"
        return {"tile": tile}, None

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return [p.row("tiled", "dense tiles", p.rows * p.cols * p.value_bytes)]

    def _values_shape(self) -> tuple[int, ...]:
        return (self.shape[0] * self.shape[1] // self.tile, self.tile)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(self.shape)

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {}

    def _params(self) -> dict[str, Any]:
        return {"tile": self.tile}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        return cls(shape, dtype, int(params["tile"]), None)

    def check(self, full: bool = False) -> None:
        need({"values": self.values}, "values", None, self._values_shape(), "tiled")


@pytest.fixture
def tiled_registered(monkeypatch):
    FORMATS.names()  # discover the real formats first
    monkeypatch.setitem(FORMATS._items, "tiled", Tiled)
    yield Tiled


def _help(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_registered_format_and_option_is_in_pack_help(capsys):
    text = _help(capsys, "pack")
    listed = text.split("formats (--format):", 1)[1]
    for name, line in pack_formats().items():
        assert f"  {name}" in listed and line in listed
    for option in format_options().values():
        assert option.flag in text
    assert {"nm", "bitmask", "coo", "csr", "bsr", "dense", "sparse-24-bitmask"} <= set(pack_formats())


def test_every_merge_method_is_in_merge_help(capsys):
    from sparsemerge.merge import get_method, list_methods

    text = _help(capsys, "merge")
    listed = text.split("their parameters (per model; global):", 1)[1]
    for name in list_methods():
        spec = get_method(name)
        line = next(row for row in listed.splitlines() if row.split() and row.split()[0] == name)
        assert all(p in line for p in [*spec.model_params, *spec.global_params])


def test_a_format_module_that_registers_itself_is_packed_read_and_planned(tiled_registered, tmp_path, capsys):
    # the help lists it with its option
    text = _help(capsys, "pack")
    assert "tiled" in text and "--tile" in text and Tiled.help in text
    # pack a checkpoint through the CLI: the targeted weight with 6 columns takes the format,
    # the one with 5 columns stays dense with the format's reason
    torch.manual_seed(0)
    weights = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(4, 6),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 5),
        "model.norm.weight": torch.randn(6),
    }
    src = tmp_path / "src.safetensors"
    save_file(weights, str(src))
    out = tmp_path / "packed"
    assert main(["pack", str(src), str(out), "--format", "tiled", "--tile", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "packed 1 of 3 tensors as tiled" in captured.out
    assert "kept dense model.layers.0.mlp.down_proj.weight: 5 columns not divisible by tile 3" in captured.err
    manifest = json.loads((out / "sparsemerge_packed.json").read_text())
    record = manifest["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert record["format"] == "tiled" and record["params"]["tile"] == 3
    assert manifest["options"]["tile"] == 3 and manifest["options"]["format"] == "tiled"
    with read_packed(out) as packed:
        obj = packed.get_format("model.layers.0.mlp.up_proj.weight")
        assert isinstance(obj, Tiled) and obj.values.shape == (8, 3)
        for name, tensor in weights.items():
            assert torch.equal(packed.get_dense(name), tensor)
    # the size plan asks the format for its row, in its plan_order
    rows = plan((16, 32), "2:4", value_bytes=2)
    names = [r.format for r in rows]
    assert names.index("bitmask") < names.index("tiled") < names.index("bsr")
    assert rows[names.index("tiled")].nbytes == 16 * 32 * 2


def test_pack_config_validates_against_the_registry(tiled_registered):
    with pytest.raises(ValueError, match=r"unknown format 'nope'; known formats: .*nm.*tiled"):
        PackConfig(format="nope")
    with pytest.raises(ValueError, match=r"unknown pack option\(s\) bogus; known: .*tile"):
        PackConfig(bogus=1)
    assert PackConfig(format="tiled", tile=6).option("tile") == 6
    assert PackConfig(format="tiled").option("tile") == 4  # the declared default
    assert PackConfig().option("metadata") == "entropy"  # a field
    # a format option not given is not recorded: existing manifests keep their exact options
    assert "tile" not in PackConfig().model_dump()


def test_bsr_and_nm_keep_their_reasons(tmp_path):
    weights = {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 6)}
    src = tmp_path / "w.safetensors"
    save_file(weights, str(src))
    report = pack(src, tmp_path / "b", format="bsr", block=4)
    assert report.kept_dense == [("model.layers.0.mlp.up_proj.weight", "shape (8, 6) not divisible by block 4")]
    report = pack(src, tmp_path / "n", pattern="4:8")
    assert report.kept_dense == [("model.layers.0.mlp.up_proj.weight", "input dimension 6 not divisible by M=8")]


def test_building_the_cli_leaves_the_registries_unloaded():
    """pack/merge read the registries only when they are the command (defer in cli/common.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import sparsemerge

    src = str(Path(sparsemerge.__file__).resolve().parents[1])  # the sparsemerge under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = ("import sys; from sparsemerge.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('sparsemerge.formats.base', 'sparsemerge.merge.base') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "[]"
