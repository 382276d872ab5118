"""The task store: entries, reconstruction, version chains, tamper detection, errors, CLI."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deploy_testlib import make_base, make_finetune
from sparsemerge.cli.main import main
from sparsemerge.deploy import vectors as V
from sparsemerge.deploy.store import TaskStore
from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.model import read_packed
from sparsemerge.io import open_tensor_source


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("family")
    hf, packed = make_base(tmp, tiny_tokenizer)
    ft1 = make_finetune(hf, tmp / "ft1", seed=1)
    ft2 = make_finetune(ft1, tmp / "ft2", seed=2, scale=0.01)
    ft3 = make_finetune(ft2, tmp / "ft3", seed=3, scale=0.01)
    return {"tmp": tmp, "hf": hf, "packed": packed, "ft1": ft1, "ft2": ft2, "ft3": ft3}


def _true_tau(family, ft: Path, space: str = "slots") -> dict[str, torch.Tensor]:
    """tau by hand: fine-tune minus the decoded base, at the base's kept slots for N:M tensors."""
    out = {}
    with read_packed(family["packed"]) as base, open_tensor_source(ft) as task:
        for name in base.names():
            if name not in task:
                continue
            obj = base.get_format(name)
            diff = task.get(name).float() - obj.to_dense().float()
            if space == "slots" and obj.name == "nm":
                diff = V.to_slots(diff, V.slot_positions(obj), obj.m)
            if bool((diff != 0).any()):
                out[name] = diff
    return out


def test_aligned_entry_reconstructs_tau_at_the_base_slots_exactly(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    entry = store.add("a", family["ft1"], select="nm", density=1.0, quant="none")
    want = _true_tau(family, family["ft1"])
    got = store.task_vector("a")
    assert sorted(got) == sorted(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    nm_names = set(store.index["base"]["nm"])
    assert nm_names and all(entry["spaces"][n] == "slots" for n in nm_names if n in entry["spaces"])
    # the fine-tune changed every weight: about half of |tau|^2 of a 2:4 layer sits on the kept slots
    assert 0.35 < entry["on_pattern_energy"] < 0.65
    assert store.verify() == []


def test_topk_keeps_the_largest_entries_and_int8_stays_close(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    store.add("k", family["ft1"], select="topk", density=0.25, quant="none")
    store.add("q", family["ft1"], select="nm", density=1.0, quant="int8", group_size=16)
    want = _true_tau(family, family["ft1"], space="dense")
    got = store.task_vector("k")
    name = "model.layers.0.mlp.up_proj.weight"
    k = math.ceil(0.25 * want[name].numel())
    assert int((got[name] != 0).sum()) == k
    threshold = want[name].abs().flatten().kthvalue(want[name].numel() - k + 1).values
    kept = got[name] != 0
    assert torch.equal(got[name][kept], want[name][kept]) and bool((want[name][kept].abs() >= threshold).all())
    slots = _true_tau(family, family["ft1"])
    q = store.task_vector("q")[name]
    # INT8 symmetric per 16 values: error at most half a step, absmax / 127 / 2
    step = slots[name].abs().reshape(slots[name].shape[0], -1, 16).amax(-1).repeat_interleave(16, 1) / 127
    assert bool(((q - slots[name]).abs() <= step / 2 + 1e-7).all())


def test_versions_are_deltas_and_the_chain_reconstructs_each(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    store.add("t", family["ft1"], density=1.0, quant="none")
    e2 = store.add("t", family["ft2"], new_version=True)
    e3 = store.add("t", family["ft3"], new_version=True)
    assert e2["kind"] == "delta" and e2["parent"]["version"] == 1 and e3["parent"]["version"] == 2
    assert store.versions("t") == [1, 2, 3]
    for version, ft in ((1, "ft1"), (2, "ft2"), (3, "ft3")):
        got, want = store.task_vector("t", version), _true_tau(family, family[ft])
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)
    # the delta against the previous version is stored, not the whole vector again
    delta = V.read_tensors(store.path / "tasks/t/v2/tau")
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(delta[name], _true_tau(family, family["ft2"])[name] - _true_tau(family, family["ft1"])[name], atol=1e-6, rtol=0)
    assert store.verify() == []


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def test_tampering_anywhere_in_the_chain_is_detected(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    store.add("t", family["ft1"], density=0.5)
    store.add("t", family["ft2"], new_version=True)
    store.add("u", family["ft1"], density=0.5)
    assert store.verify() == []
    shard = next((store.path / "tasks/t/v1/tau").glob("*.safetensors"))
    original = shard.read_bytes()
    _flip_byte(shard)
    problems = store.verify()
    assert len(problems) == 1 and "'t' v1" in problems[0] and "corrupt" in problems[0]
    with pytest.raises(SparsemergeError, match="v1"):
        store.task_vector("t", 2)  # v2 needs v1: the chain fails end to end
    shard.write_bytes(original)
    assert store.verify() == []
    # an edited entry.json (here: v2's parent link) no longer matches the index's sha256
    path = store.path / "tasks/t/v2/entry.json"
    entry = json.loads(path.read_text())
    entry["parent"]["version"] = 7
    path.write_text(json.dumps(entry, indent=1) + "\n")
    assert any("'t' v2" in p and "entry.json" in p for p in store.verify())
    # a rewritten entry whose sha256 is also patched into the index: the link check catches it
    from sparsemerge.io.checksum import sha256_file

    store.index["tasks"]["t"]["versions"][1]["entry_sha256"] = sha256_file(path)
    store._save_index()
    assert any("parent link" in p for p in TaskStore(store.path).verify())
    # the base itself
    _flip_byte(next((store.path / "base").glob("*.safetensors")))
    assert any(p.startswith("base:") for p in TaskStore(store.path).verify())


def test_clear_errors_and_nothing_written_on_failure(family, tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    store = TaskStore.init(tmp_path / "s", family["packed"])
    store.add("t", family["ft1"])
    with pytest.raises(SparsemergeError, match="already exists"):
        store.add("t", family["ft2"])
    with pytest.raises(SparsemergeError, match="unknown task 'nope'.*known tasks: t"):
        store.task_vector("nope")
    with pytest.raises(SparsemergeError, match="does not exist yet"):
        store.add("new", family["ft2"], new_version=True)
    with pytest.raises(SparsemergeError, match="not usable"):
        store.add("../evil", family["ft2"])
    with pytest.raises(SparsemergeError, match="density"):
        store.add("d", family["ft2"], density=0.0)
    other = make_tiny_llama(hidden=32, intermediate=64)
    other.save_pretrained(tmp_path / "other")
    before = (store.path / "store.json").read_text()
    with pytest.raises(SparsemergeError, match="shape"):
        store.add("x", tmp_path / "other")
    assert not (store.path / "tasks/x/v1").exists() and (store.path / "store.json").read_text() == before
    with pytest.raises(SparsemergeError, match="already exists"):
        TaskStore.init(tmp_path / "s", family["packed"])
    with pytest.raises(SparsemergeError, match="not a task store"):
        TaskStore(tmp_path)
    store.add("t", family["ft2"], new_version=True)
    with pytest.raises(SparsemergeError, match="parent of v2"):
        store.remove("t", 1)
    store.remove("t", 2)
    assert store.versions("t") == [1] and not (store.path / "tasks/t/v2").exists()
    store.remove("t")
    assert store.tasks() == [] and not (store.path / "tasks/t").exists()
    assert TaskStore(store.path).tasks() == []


def _write_lora(folder: Path, target: str, rows: int, cols: int, r: int = 4) -> Path:
    from sparsemerge.io.writer import save_safetensors

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    module = target[: -len(".weight")]
    save_safetensors({f"base_model.model.{module}.lora_A.weight": torch.randn(r, cols, generator=g) * 0.1,
                      f"base_model.model.{module}.lora_B.weight": torch.randn(rows, r, generator=g) * 0.1},
                     folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8,
                                                            "target_modules": [module.split(".")[-1]]}))
    return folder


def test_lora_adapters_are_stored_with_checksums(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    name = "model.layers.0.self_attn.q_proj.weight"
    adapter = _write_lora(tmp_path / "lora", name, 64, 64)
    entry = store.add("lo", adapter)
    assert entry["kind"] == "lora" and entry["targets"] == [name]
    assert store.verify() == []
    _flip_byte(store.path / "tasks/lo/v1/adapter/adapter_model.safetensors")
    assert any("'lo' v1" in p for p in store.verify())
    with pytest.raises(SparsemergeError, match="shape"):
        store.add("bad", _write_lora(tmp_path / "bad", name, 64, 32))


def test_cli_store_commands(family, tmp_path, capsys):
    s = str(tmp_path / "s")
    assert main(["store", "init", s, "--base", str(family["packed"])]) == 0
    assert main(["store", "add", s, "t", str(family["ft1"]), "--density", "0.2", "--quant", "int4", "--group-size", "32"]) == 0
    assert main(["store", "add", s, "t", str(family["ft2"]), "--new-version"]) == 0
    assert main(["store", "add", s, "t", str(family["ft2"])]) == 2  # exists: a clear error, exit 2
    capsys.readouterr()
    assert main(["store", "list", s, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = listing["tasks"]
    assert [(r["task"], r["version"], r["kind"]) for r in rows] == [("t", 1, "vector"), ("t", 2, "delta")]
    assert rows[1]["chain_bytes"] == rows[0]["bytes"] + rows[1]["bytes"]
    assert rows[0]["of_base"] == rows[0]["bytes"] / listing["base_bytes"]
    assert main(["store", "list", s]) == 0 and "chain of base" in capsys.readouterr().out
    assert main(["store", "verify", s]) == 0
    _flip_byte(next((Path(s) / "tasks/t/v2/tau").glob("*.safetensors")))
    assert main(["store", "verify", s]) == 1 and "FAILED" in capsys.readouterr().err
    assert main(["store", "remove", s, "t", "--version", "2"]) == 0
    assert main(["store", "verify", s]) == 0
    assert main(["store", "remove", s, "missing"]) == 2


def test_a_version_equal_to_the_last_stores_an_empty_delta(family, tmp_path):
    store = TaskStore.init(tmp_path / "s", family["packed"])
    store.add("t", family["ft1"], density=1.0, quant="none")
    e2 = store.add("t", family["ft1"], new_version=True)
    assert e2["spaces"] == {} and e2["nbytes"] < 2000
    v1, v2 = store.task_vector("t", 1), store.task_vector("t", 2)
    assert sorted(v1) == sorted(v2) and all(torch.equal(v1[k], v2[k]) for k in v1)
    assert store.verify() == []


def test_a_base_in_another_format_takes_topk_vectors(family, tmp_path):
    from sparsemerge.formats.model import pack

    pack(family["hf"], tmp_path / "bitmask", format="bitmask")
    store = TaskStore.init(tmp_path / "s", tmp_path / "bitmask")
    entry = store.add("t", family["ft1"], density=0.2, quant="none")
    assert entry["select"] == "topk" and set(entry["spaces"].values()) == {"dense"}
    want = _true_tau(family, family["ft1"], space="dense")
    got = store.task_vector("t")
    name = "model.layers.0.self_attn.o_proj.weight"
    kept = got[name] != 0
    assert int(kept.sum()) == math.ceil(0.2 * want[name].numel()) and torch.equal(got[name][kept], want[name][kept])


def test_a_task_finetuned_from_the_dense_model_is_measured_from_it(family, tmp_path):
    from conftest import make_tiny_llama

    dense = tmp_path / "dense"
    make_tiny_llama(hidden=64, intermediate=128).save_pretrained(dense)  # the model the base was pruned from
    ft = make_finetune(dense, tmp_path / "ft", seed=7)
    store = TaskStore.init(tmp_path / "s", family["packed"])
    entry = store.add("from-dense", ft, density=1.0, quant="none", finetuned_from=dense)
    blind = store.add("from-base", ft, density=1.0, quant="none")
    # measured from the dense model, tau is the fine-tune's own update (half of it on a 2:4 pattern);
    # measured from the pruned base its off-pattern part holds the pruned weights as well
    assert 0.35 < entry["on_pattern_energy"] < 0.65 and entry["finetuned_from"] == str(dense)
    assert blind["finetuned_from"] is None
    name = "model.layers.1.mlp.gate_proj.weight"
    with read_packed(family["packed"]) as base, open_tensor_source(ft) as t, open_tensor_source(dense) as d:
        obj = base.get_format(name)
        want = V.to_slots(t.get(name).float() - d.get(name).float(), V.slot_positions(obj), obj.m)
    assert torch.equal(store.task_vector("from-dense")[name], want)
    # magnitude pruning keeps the kept weights, so at the slots the two agree here
    torch.testing.assert_close(store.task_vector("from-base")[name], want, atol=1e-6, rtol=0)
    with pytest.raises(SparsemergeError, match="does not exist"):
        store.add("x", ft, finetuned_from=tmp_path / "missing")
