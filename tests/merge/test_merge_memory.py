"""Merging under a memory budget (merge/memory.py): tensors over the per-job slot are merged in
row blocks (rowwise methods) or alone (the others), byte for byte as without a budget; the
budget follows the process limits; row reads and row writes of the I/O layer."""
from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from merge_testlib import save_family, tensors
from sparsemerge.cli.main import main as cli_main
from sparsemerge.errors import SparsemergeError
from sparsemerge.io.reader import SafetensorsFile
from sparsemerge.io.writer import PlannedTensor, ShardedWriter
from sparsemerge.merge import memory as M
from sparsemerge.merge import run_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, tuned = save_family(root, 2)
    return base, tuned


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(M, "MIN_BLOCK_BYTES", 1)  # let the tiny model's tensors split into many blocks


def _files_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


CONFIGS = {
    "linear": lambda b, t: {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                                   for m, w in zip([b, *t], (0.5, 0.3, 0.2))]},
    "model_soup": lambda b, t: {"merge_method": "model_soup", "models": [{"model": str(m)} for m in (b, *t)]},
    "task_arithmetic": lambda b, t: {"merge_method": "task_arithmetic", "base_model": str(b), "out_dtype": "bfloat16",
                                     "models": [{"model": str(m), "parameters": {"weight": 0.7}} for m in t]},
    "passthrough": lambda b, t: {"merge_method": "passthrough", "models": [{"model": str(t[0]), "parameters": {"scale": 0.5}}]},
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_row_blocked_merge_is_byte_identical(family, tmp_path, small_blocks, method):
    base, tuned = family
    cfg = CONFIGS[method](base, tuned)
    whole = run_merge(cfg, tmp_path / "whole", workers=2)
    assert not whole.memory["row_blocked"] and not whole.memory["alone"]  # the machine's memory is ample
    blocked = run_merge(cfg, tmp_path / "blocked", workers=2, max_memory=200_000)
    rows = blocked.memory["row_blocked"]
    assert blocked.memory["budget_bytes"] == 200_000 and blocked.memory["slot_bytes"] == 200_000 // 5
    assert "model.embed_tokens.weight" in rows and 1 <= rows["model.embed_tokens.weight"] < 384
    assert not blocked.memory["alone"]
    assert _files_bytes(tmp_path / "blocked") == _files_bytes(tmp_path / "whole")


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory, family):
    """Two variants whose deltas are multiples of 0.01: most magnitudes tie, so which tied
    entries the trim keeps (mergekit's sort order) decides the result."""
    base, _ = family
    root = tmp_path_factory.mktemp("tied")
    b = tensors(base)
    out = []
    for i in range(2):
        g = torch.Generator().manual_seed(50 + i)
        state = {k: v + torch.round(torch.randn(v.shape, generator=g) * 2) / 100 for k, v in b.items()}
        d = root / f"tied{i}"
        d.mkdir()
        save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text((base / "config.json").read_text())
        out.append(d)
    return base, out


def _ties(base, tuned, densities=(0.5, 0.3), **extra):
    return {"merge_method": "ties", "base_model": str(base), **extra,
            "models": [{"model": str(m), "parameters": {"weight": w, "density": d}}
                       for m, w, d in zip(tuned, (0.6, 0.4), densities)]}


@pytest.mark.parametrize("densities", [(0.5, 0.3), (1.0, 0.2)])
def test_ties_in_row_blocks_keeps_the_same_tied_entries(tied_family, tmp_path, small_blocks, densities):
    base, tuned = tied_family
    cfg = _ties(base, tuned, densities)
    run_merge(cfg, tmp_path / "whole", workers=2)
    report = run_merge(cfg, tmp_path / "blocked", workers=2, max_memory=400_000)
    rows = report.memory["row_blocked"]
    assert 1 <= rows["model.embed_tokens.weight"] < 384 and "model.embed_tokens.weight" in report.memory["alone"]
    assert _files_bytes(tmp_path / "blocked") == _files_bytes(tmp_path / "whole")


def test_whole_tensor_methods_run_alone_with_the_same_result(tied_family, tmp_path, small_blocks):
    base, tuned = tied_family
    for name, cfg in (("ties-rescale", _ties(base, tuned, parameters={"rescale": True})),  # a norm: whole tensor
                      ("ties-tiny-budget", _ties(base, tuned)),  # the selection itself does not fit
                      ("dare", {**_ties(base, tuned), "merge_method": "dare_ties"})):
        run_merge(cfg, tmp_path / f"{name}-whole", workers=2)
        report = run_merge(cfg, tmp_path / f"{name}-alone", workers=2,
                           max_memory=100_000 if name == "ties-tiny-budget" else 400_000)
        assert "model.embed_tokens.weight" in report.memory["alone"], name
        if name != "ties-rescale":  # rescale is found out only when the blocks start: planned in rows, done whole
            assert "model.embed_tokens.weight" not in report.memory["row_blocked"], name
        assert _files_bytes(tmp_path / f"{name}-alone") == _files_bytes(tmp_path / f"{name}-whole"), name


def test_non_finite_rows_are_refused_and_nothing_is_written(family, tmp_path, small_blocks):
    base, tuned = family
    bad = tmp_path / "bad"
    bad.mkdir()
    state = tensors(tuned[0])
    state["model.embed_tokens.weight"][300, 5] = float("nan")  # a late block
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text((tuned[0] / "config.json").read_text())
    cfg = CONFIGS["linear"](base, [bad, tuned[1]])
    with pytest.raises(SparsemergeError, match="NaN|non-finite|infinit"):
        run_merge(cfg, tmp_path / "out", max_memory=200_000)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- planning and the budget
def test_plan_tensor_rows_fit_the_slot():
    need = M.working_set((1000, 256), [torch.float32] * 3, torch.float32)
    assert need == 1000 * 256 * (12 + 11 * 4)  # read 3 x 4 bytes, (3 * 3 + 2) float32 working copies
    assert M.plan_tensor((1000, 256), need, None, True) == M.BlockPlan()
    assert M.plan_tensor((1000, 256), need, need, True) == M.BlockPlan()
    plan = M.plan_tensor((1000, 256), need, need // 10, True)
    assert plan.rows is not None and plan.rows * (need // 1000) <= max(need // 10, M.MIN_BLOCK_BYTES)
    assert M.plan_tensor((1000, 256), need, need // 10, False) == M.BlockPlan(exclusive=True)
    assert M.plan_tensor((1, 256), need, 1, True) == M.BlockPlan(exclusive=True)  # one row cannot split


def test_budget_follows_the_data_limit(monkeypatch):
    used, limit = 300 << 20, 1 << 30
    real = resource.getrlimit
    monkeypatch.setattr(M.resource, "getrlimit", lambda which: (limit, limit) if which == resource.RLIMIT_DATA else real(which))
    monkeypatch.setattr(M, "_status_bytes", lambda key: used if key == "VmData" else 0)
    monkeypatch.setattr(M, "_mem_available", lambda: 64 << 30)
    assert M.memory_budget() == int((limit - used) * M.SAFETY)
    monkeypatch.setattr(M, "_mem_available", lambda: 100 << 20)  # the system has less left than the limit
    assert M.memory_budget() == int((100 << 20) * M.SAFETY)
    assert M.memory_budget(12345) == 12345
    with pytest.raises(SparsemergeError, match="positive"):
        M.memory_budget(0)


@pytest.mark.parametrize("text,value", [("800M", 800 << 20), ("1.5G", int(1.5 * 2**30)), ("2GiB", 2 << 30),
                                        ("64kb", 64 << 10), ("123456", 123456), ("1 T", 1 << 40)])
def test_parse_size(text, value):
    assert M.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0", "nanG", "infM"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(SparsemergeError, match="memory size"):
        M.parse_size(text)


# ---------------------------------------------------------------- row reads and row writes
def test_get_rows_reads_exactly_those_rows(tmp_path):
    t = torch.arange(7 * 3 * 2, dtype=torch.float32).reshape(7, 3, 2)
    save_file({"t": t, "s": torch.tensor(1.0)}, str(tmp_path / "a.safetensors"))
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert torch.equal(f.get_rows("t", 2, 5), t[2:5]) and torch.equal(f.get_rows("t", 7, 7), t[7:7])
    with pytest.raises(SparsemergeError, match="outside"):
        f.get_rows("t", 5, 8)
    with pytest.raises(SparsemergeError, match="scalar"):
        f.get_rows("s", 0, 1)


def test_write_rows_lands_at_the_planned_offsets_and_checks_the_count(tmp_path):
    from safetensors.torch import load_file

    a, b = torch.randn(10, 4), torch.randn(3)
    plan = [PlannedTensor("a", (10, 4), torch.float32), PlannedTensor("b", (3,), torch.float32)]
    w = ShardedWriter(tmp_path / "ok", plan=plan, layout="plan")
    w.write_rows("a", iter([a[:3], a[3:9], a[9:]]))
    w.write("b", b)
    w.finish()
    out = load_file(str(tmp_path / "ok" / "model.safetensors"))
    assert torch.equal(out["a"], a) and torch.equal(out["b"], b)
    w = ShardedWriter(tmp_path / "short", plan=plan, layout="plan")
    with pytest.raises(SparsemergeError, match="9 of the planned 10 rows"):
        w.write_rows("a", iter([a[:9]]))
    assert not list((tmp_path / "short").glob("*.safetensors"))


def test_cli_max_memory(family, tmp_path, capsys, small_blocks):
    import yaml

    base, tuned = family
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml.safe_dump(CONFIGS["linear"](base, tuned)))
    assert cli_main(["merge", str(cfg), str(tmp_path / "out"), "--max-memory", "200K", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "merged in row blocks" in out and "memory: budget 0.00 GiB" in out
    assert cli_main(["merge", str(cfg), str(tmp_path / "out2"), "--max-memory", "lots", "--no-progress"]) != 0
    assert "memory size" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_out_of_memory_is_a_clear_error_and_writes_nothing(family, tmp_path, monkeypatch):
    from sparsemerge.merge.methods import linear as linear_module

    def exhausted(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 262144000 bytes")

    monkeypatch.setattr(linear_module, "linear_combination", exhausted)
    base, tuned = family
    with pytest.raises(SparsemergeError, match=r"out of memory merging .*\[384, 64\].*Nothing was written.*262144000"):
        run_merge(CONFIGS["linear"](base, tuned), tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
