"""formats/inspect.py (``sparsemerge inspect`` rows) and size.storage_plan (``inspect --plan``),
against hand-computed bytes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sparsemerge.formats.inspect import InspectRow, format_label, inspect_rows
from sparsemerge.formats.model import pack
from sparsemerge.formats.size import PlanSection, SparsityChoices, plan, storage_plan


def test_inspect_rows_of_a_dense_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(4, 8, dtype=torch.float16), "b": torch.zeros(3, dtype=torch.float32)}, str(path))
    rows, (nbytes, numel) = inspect_rows(path)
    assert rows == [InspectRow("a", "dense float16", "4x8", 64, 16.0, 1.0, 0.5), InspectRow("b", "dense float32", "3", 12, 32.0, 2.0, 1.0)]
    assert (nbytes, numel) == (76, 35)


def test_inspect_rows_of_a_packed_folder(tmp_path):
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0] * 2] * 4)  # 2:4, 4x8
    path = tmp_path / "w.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": weight}, str(path))
    pack(path, tmp_path / "p", metadata="bits2")
    rows, (nbytes, numel) = inspect_rows(tmp_path / "p", verify=True)
    # 16 float32 values (64 B) + 4 rows x 2 groups x 2 positions x 2 bits = 32 bits (4 B)
    assert rows == [InspectRow("model.layers.0.mlp.up_proj.weight", "nm 2:4 bits2", "4x8", 68, 17.0, 68 / 64, 68 / 128)]
    assert (nbytes, numel) == (68, 32)


def test_format_label():
    assert format_label({"format": "bitmask", "params": {"codec": {"kind": "int8"}}}) == "bitmask+int8"
    assert format_label({"format": "nm", "params": {"n": 1, "m": 4, "metadata": "index", "codec": None}}) == "nm 1:4 index"
    assert format_label({"format": "dense", "params": {}}) == "dense"


def test_storage_plan_expands_a_sparsity_into_its_nm_patterns():
    items = list(storage_plan((64, 64), ["2:4", "0.75"], value_bytes=2, max_m=8))
    assert [type(i) for i in items] == [PlanSection, SparsityChoices, PlanSection, PlanSection]
    assert items[0].pattern == "2:4" and items[0].rows == plan((64, 64), "2:4", 2)
    assert [(o.n, o.m) for o in items[1].overheads] == [(1, 4), (2, 8)]
    assert [s.pattern for s in items[2:]] == ["1:4", "2:8"]
    # dense first; 1:4 keeps 1024 values: nm/bits2 = 1024*2 B + 64 rows * 16 groups * 2 bits / 8
    rows = {r.format: r.nbytes for r in items[2].rows}
    assert items[2].rows[0].format == "dense" and rows["nm/bits2"] == 2048 + 256


def test_storage_plan_is_lazy_in_print_order():
    items = storage_plan((64, 62), ["0.5", "2:4"])
    assert isinstance(next(items), SparsityChoices)  # printed before a later pattern fails
    with pytest.raises(Exception, match="divisible"):
        list(items)
