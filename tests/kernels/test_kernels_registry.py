"""The kernel registry: every row forced by name against the reference, the choice and its
reasons, the CPU feature cap, and the module graph of kernels/ (no import cycle)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels import KERNELS, SparseLinear, cpu_level, force_kernel, select
from sparsemerge.kernels import cpu_vnni as V
from sparsemerge.kernels.backends import rows
from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.dispatch import cpu_fast_path_allowed
from sparsemerge.kernels.features import host_features
from sparsemerge.kernels.layout import pack_blocked
from sparsemerge.kernels.reference import reference_matmul
from sparsemerge.masks import nm_mask

CPU_ROWS = [k.name for k in rows() if k.device == "cpu"]


def nm_weight(rows_: int, cols: int, n: int = 2, m: int = 4, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows_, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), n, m)


class Req:
    """What the rows read of a SparseLinear: the layout and the activation mode."""

    def __init__(self, layout, act_quant):
        self.layout, self.act_quant = layout, act_quant


# (codec, group size, value dtype, n, m): every combination some row handles
LAYERS = [("none", None, "float32", 2, 4), ("none", None, "bfloat16", 2, 4), ("int8", None, "float32", 2, 4),
          ("int8", 128, "float32", 2, 4), ("int4", None, "float32", 2, 4), ("int4", 128, "float32", 2, 4),
          ("int8", None, "float32", 4, 8)]


def hier_layouts(rows_: int, cols: int) -> list:
    """Hierarchical N:M layouts (kernels/hier.py; per-row blocks, as 197 rows take no tile)."""
    from sparsemerge.formats.base import CodecSpec
    from sparsemerge.formats.hnm import HNMPacked
    from sparsemerge.kernels.hier import HierLayout
    from sparsemerge.masks import hier_mask

    w = torch.randn(rows_, cols, generator=torch.Generator().manual_seed(rows_))
    w = w * hier_mask(w.abs(), "hier:1:2@1x16/2:4")
    return [HierLayout.from_packed(HNMPacked.from_dense(w, "hier:1:2@1x16/2:4").with_codec(CodecSpec(codec, 32)))
            for codec in ("none", "int8", "int4")]


@pytest.mark.parametrize("name", CPU_ROWS)
@pytest.mark.parametrize("rows_,cols", [(197, 576), (5, 1536)])
def test_every_cpu_row_forced_by_name_matches_the_reference(name, rows_, cols):
    kernel = KERNELS.get(name)
    missing = [f for f in kernel.features if f not in host_features()]
    if missing:
        pytest.skip(f"CPU lacks {missing}")
    ran = 0
    layouts = [pack_blocked(nm_weight(rows_, cols, n, m, seed=rows_), n, m, codec, gs, dtype) for codec, gs, dtype, n, m in LAYERS]
    for layout in layouts + hier_layouts(rows_, cols):
        for act_quant in ("none", "int8"):
            for batch in (1, 3):
                x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
                req = Req(layout, act_quant)
                if kernel.supports(req, x) is not None:
                    continue
                y = select(req, x, forced=name).run(req, x)
                assert y.shape == (batch, rows_)
                if kernel.act_quant == "int8":
                    torch.testing.assert_close(y, V.reference_w8a8(layout, x), rtol=1e-5, atol=1e-4)
                else:
                    torch.testing.assert_close(y, reference_matmul(layout, x), rtol=1e-4, atol=5e-4)
                ran += 1
    assert ran > 0, f"no test layer exercised {name}"


def test_a_forced_row_that_cannot_run_raises_with_its_reason():
    layout = pack_blocked(nm_weight(8, 64, 4, 8), 4, 8)
    x = torch.randn(1, 64)
    with pytest.raises(SparsemergeError, match="'numba-gemv24' was forced but cannot run this layer: 4:8 is not 2:4"):
        select(layout, x, forced="numba-gemv24")
    with pytest.raises(ValueError, match="the gemm24 path cannot run this layer: 4:8 is not 2:4"):
        cpu_matmul(layout, x, path="gemm24")
    with pytest.raises(SparsemergeError, match="known kernels: .*numba-general"):
        select(layout, x, forced="avx9")


def test_non_24_layers_fall_back_to_the_general_row_with_reasons():
    layer = SparseLinear.from_dense(nm_weight(70, 64, 4, 8), n=4, m=8)
    name, reasons = layer.kernel_choice
    assert name == "numba-general"
    skipped = dict(reasons)
    assert skipped["numba-gemv24"] == "4:8 is not 2:4" and skipped["cuda"] == "input is on cpu, not cuda"
    assert "is not 2:4" in skipped["avx512-gather-f32"] or "lacks" in skipped["avx512-gather-f32"]
    x = torch.randn(1, 64)
    torch.testing.assert_close(layer(x), reference_matmul(layer.layout, x), rtol=1e-5, atol=1e-5)


def test_choice_is_cached_per_situation_and_explained():
    layer = SparseLinear.from_dense(nm_weight(64, 64), prune=True)
    with force_kernel("reference"):
        layer(torch.randn(1, 64))
        assert layer.kernel_choice[0] == "reference"
        assert "forced by 'reference'" in layer.explain_kernel().why()
    layer(torch.randn(2, 64))
    assert layer.explain_kernel(batch=2).name == "numba-gemm24"
    keys = set(layer.__dict__["_kernel"])
    assert ("cpu", True, "reference", None) in keys and ("cpu", False, None, None) in keys


def test_feature_cap_excludes_the_avx512_rows():
    layer = SparseLinear.from_dense(nm_weight(64, 64), prune=True)
    with cpu_level("none"):
        name, reasons = layer.kernel_choice
        assert name == "numba-gemv24"
        # A CPU with the features is refused by the cap; one without them, by the CPU itself.
        has_avx512 = {"avx512f", "avx512bw", "avx512vbmi"} <= set(host_features())
        why = "the CPU feature cap 'none' excludes" if has_avx512 else "the CPU lacks"
        assert dict(reasons)["avx512-gather-f32"].startswith(why)
        with pytest.raises(SparsemergeError, match=why):
            select(layer, torch.zeros(1, 64), forced="avx512-gather-f32")
    with pytest.raises(ValueError, match="empty CPU feature cap"):
        with cpu_level(","):
            pass


def test_environment_forces_a_row_and_a_cap(monkeypatch):
    layer = SparseLinear.from_dense(nm_weight(64, 64), prune=True)
    x = torch.randn(1, 64)
    monkeypatch.setenv("SPARSEMERGE_KERNEL", "numba-gemm24")
    assert layer.kernel_choice[0] == "numba-gemm24"
    torch.testing.assert_close(layer(x), reference_matmul(layer.layout, x), rtol=1e-5, atol=1e-5)
    assert cpu_fast_path_allowed()
    monkeypatch.setenv("SPARSEMERGE_KERNEL", "reference")
    assert not cpu_fast_path_allowed()
    monkeypatch.delenv("SPARSEMERGE_KERNEL")
    monkeypatch.setenv("SPARSEMERGE_CPU_FEATURES", "avx2,fma")
    assert not layer.kernel_choice[0].startswith("avx512")


def test_int8_activation_rows_fall_back_to_a_float_row_on_nan():
    layout = pack_blocked(nm_weight(64, 256), 2, 4, "int8")
    req = Req(layout, "int8")
    x = torch.randn(1, 256)
    x[0, 7] = float("nan")
    choice = select(req, x, forced=None)
    assert choice.fallback is None or choice.fallback.kernel.act_quant == "none"
    assert torch.isnan(choice.run(req, x)).any()


def _imports(path: Path, package: str) -> set[str]:
    """Every sparsemerge.kernels module ``path`` imports, at any level (function bodies too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(package))
    return out


def test_kernels_modules_have_no_import_cycle():
    import sparsemerge.kernels as K

    root = Path(K.__file__).parent
    modules = {f"sparsemerge.kernels.{p.stem}": p for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in _imports(p, "sparsemerge.kernels") if d in modules and d != m} for m, p in modules.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"import cycles through {cycles}"
    assert "sparsemerge.kernels.dispatch" not in graph["sparsemerge.kernels.backends"]


def test_rows_describe_their_features_and_what_they_handle():
    from sparsemerge.kernels.dispatch import describe_rows

    table = {name: (prio, feats, handles) for name, prio, feats, handles, _ in describe_rows()}
    assert list(table) == [k.name for k in rows()]  # by priority
    assert table["avx2-f32"] == (22, "avx2,fma", "2:4, none, float32 values, batch 1")
    assert table["avx2-a8"][2] == "2:4, int8/int4, batch 1, int8 activations"
    assert table["numba-general"][1:] == ("-", "N:M, any codec, any batch")
    assert table["avx512-vnni-a8"][0] < table["avxvnni-a8"][0] < table["avx2-a8"][0] < table["avx512-gather-f32"][0]
    assert set(KERNELS.get("cpu").members) == {k.name for k in rows() if k.device == "cpu"}
