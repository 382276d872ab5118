"""Task switching in memory: base + tau in place equals the task model built on its own,
the base comes back bit for bit, task arithmetic, the LRU cache of combinations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deploy_testlib import make_base, make_finetune
from sparsemerge.deploy import vectors as V
from sparsemerge.deploy.cache import LRUCache
from sparsemerge.deploy.store import TaskStore
from sparsemerge.deploy.switch import TaskSwitcher, parse_spec
from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels.layout import positions_of
from sparsemerge.kernels.model import load_packed
from sparsemerge.kernels.sparse_linear import SparseLinear
from sparsemerge.kernels.cpu_vnni import cpu_features_missing as vnni_missing
from sparsemerge.runtime import step as S
from sparsemerge.runtime.engine import DecodeEngine

IDS = [1, 5, 9, 3, 7, 11, 2, 40]


def _store(tmp, tokenizer, quant: str, **pack_kw):
    hf, packed = make_base(tmp, tokenizer, quant=quant, **pack_kw)
    store = TaskStore.init(tmp / "store", packed)
    store.add("a", make_finetune(hf, tmp / "fa", seed=1, scale=0.05), density=0.5, quant="int8", group_size=16)
    store.add("b", make_finetune(hf, tmp / "fb", seed=2, scale=0.05), density=0.3, quant="int4", group_size=16)
    store.add("k", make_finetune(hf, tmp / "fk", seed=3, scale=0.05), select="topk", density=0.3, quant="int8")
    return store


@pytest.fixture(scope="module")
def float_store(tmp_path_factory, tiny_tokenizer):
    return _store(tmp_path_factory.mktemp("f32"), tiny_tokenizer, "none")


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory, tiny_tokenizer):
    return _store(tmp_path_factory.mktemp("i8"), tiny_tokenizer, "int8", group_size=16)


@pytest.fixture(scope="module")
def int8pc_store(tmp_path_factory, tiny_tokenizer):
    """2:4 INT8 per output channel: what the INT8-activation (VNNI) kernels run."""
    return _store(tmp_path_factory.mktemp("i8pc"), tiny_tokenizer, "int8", group_size=0)


@pytest.fixture(scope="module")
def nm48_store(tmp_path_factory, tiny_tokenizer):
    """4:8 INT4 with a zero point: the general N:M kernel's arrays, asymmetric re-quantization."""
    return _store(tmp_path_factory.mktemp("i4"), tiny_tokenizer, "int4", pattern="4:8", group_size=16, symmetric=False)


def _reference(store: TaskStore, weights: dict[str, float]):
    """The task model built independently: a fresh base, each SparseLinear decoded to dense,
    ``+ sum w tau`` in dense space at the base's kept positions, packed again with its codec."""
    loaded = load_packed(store.base_dir)
    model = loaded.model
    taus = {}
    for task, w in weights.items():
        tau, spaces = store.task_vector(task), store.spaces(task)
        taus[task] = (w, tau, spaces)
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, SparseLinear):
                lay = module.layout
                pos = positions_of(lay)
                dense = module.to_dense()
                for w, tau, spaces in taus.values():
                    t = tau.get(name + ".weight")
                    if t is None:
                        continue
                    if spaces[name + ".weight"] == V.SLOTS:
                        t = V.from_slots(t, pos, lay.m)
                    else:  # top-k in dense space: only its part on the base's pattern
                        t = V.from_slots(V.to_slots(t, pos, lay.m), pos, lay.m)
                    dense = dense + (t if w == 1.0 else t * w)
                symmetric = lay.zero is None or (lay.codec == "int4" and bool((lay.zero == 8).all()))
                new = SparseLinear.from_dense(dense, module.bias, lay.n, lay.m, None if lay.codec == "none" else lay.codec,
                                              lay.group_size, symmetric=symmetric)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)
        for pname, p in model.named_parameters():
            for w, tau, _ in taus.values():
                if pname in tau:
                    p.add_(tau[pname] if w == 1.0 else tau[pname] * w)
    return loaded


def _logits(engine) -> np.ndarray:
    engine.reset()
    out = [engine.prefill(IDS[:3]).copy()]
    out += [engine.step(t).copy() for t in IDS[3:]]
    return np.stack(out)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("which", ["float", "int8", "int8 a8", "4:8 int4"])
def test_switching_equals_the_task_model_and_returns_to_the_base_bit_for_bit(which, request):
    store = request.getfixturevalue({"float": "float_store", "int8": "int8_store", "int8 a8": "int8pc_store",
                                     "4:8 int4": "nm48_store"}[which])
    act_quant = "int8" if which.endswith("a8") else "none"
    if act_quant == "int8" and vnni_missing():
        pytest.skip(f"the INT8-activation kernels need {vnni_missing()}")
    loaded = load_packed(store.base_dir)
    engine = DecodeEngine(loaded.model, loaded.tokenizer, act_quant=act_quant, max_seq=32)
    switcher = TaskSwitcher(store, loaded.model, engine)
    base_state, base_logits = _state(loaded.model), _logits(engine)
    for spec, weights in [("a", {"a": 1.0}), ("0.5*a+0.25*b", {"a": 0.5, "b": 0.25}), ("b", {"b": 1.0}), ("k", {"k": 1.0})]:
        switcher.activate(spec)
        ref = _reference(store, weights)
        got_sd, ref_sd = loaded.model.state_dict(), ref.model.state_dict()
        for name, module in ref.model.named_modules():
            if isinstance(module, SparseLinear):
                assert torch.equal(loaded.model.get_submodule(name).to_dense(), module.to_dense()), (spec, name)
        for k in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
            assert torch.equal(got_sd[k], ref_sd[k]), (spec, k)
        assert not torch.equal(got_sd["model.embed_tokens.weight"], base_state["model.embed_tokens.weight"])
        # the runtime over the switched model decodes exactly as a runtime over the task model alone
        np.testing.assert_array_equal(_logits(engine), _logits(DecodeEngine(ref.model, act_quant=act_quant, max_seq=32)))
    if which == "int8 a8":
        assert S.KIND_A8 in {p.kind for p in engine.plan.layers}
    if which == "4:8 int4":
        assert S.KIND_BG in {p.kind for p in engine.plan.layers}
    switcher.base()
    after = loaded.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    np.testing.assert_array_equal(_logits(engine), base_logits)
    fresh = load_packed(store.base_dir).model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())


def test_topk_and_lora_tasks_are_projected_onto_the_base_pattern(float_store):
    switcher = TaskSwitcher(float_store)
    switcher.activate("k")
    # a top-k entry of a fine-tune that changed every weight: about half of |tau|^2 sits off a 2:4 pattern
    assert 0.3 < switcher.dropped["k"] < 0.7
    name = "model.layers.0.mlp.down_proj"
    module = switcher.model.get_submodule(name)
    dense = module.to_dense()
    base = load_packed(float_store.base_dir).model.get_submodule(name).to_dense()
    assert torch.equal((dense != 0), (base != 0)) or bool(((dense != 0) <= (base != 0)).all())  # the pattern is kept


def test_the_cache_keeps_recent_combinations_within_its_bytes(float_store):
    switcher = TaskSwitcher(float_store, cache_bytes=1 << 30)
    switcher.activate("a")
    one = switcher.cache.nbytes
    assert one > 0 and switcher.cache.misses == 1
    switcher.activate("b")
    switcher.activate("a")  # from the cache
    assert switcher.cache.hits == 1 and len(switcher.cache) == 2
    small = TaskSwitcher(float_store, model=switcher.model, cache_bytes=int(one * 1.5))
    switcher.base()
    small.activate("a")
    small.activate("b")  # evicts a
    assert small.cache.keys() == [(("b", 1, 1.0),)] and small.cache.evictions == 1
    before = {k: v.clone() for k, v in small.model.state_dict().items()}
    small.activate("a")  # computed again: the same tensors
    small.activate("b")
    assert all(torch.equal(v, small.model.state_dict()[k]) for k, v in before.items())
    assert small.memory()["cache"] == small.cache.nbytes <= small.cache.capacity
    tiny = TaskSwitcher(float_store, model=switcher.model, cache_bytes=10)
    tiny.activate("a")  # too big to keep: not cached, still applied
    assert len(tiny.cache) == 0 and tiny.active == (("a", 1, 1.0),)
    tiny.base()


def test_lru_cache_order_and_bounds():
    cache = LRUCache(10, len)
    assert cache.put("a", "xxxx") and cache.put("b", "yyyy")
    assert cache.get("a") == "xxxx"  # a is now the most recent
    assert cache.put("c", "zzzz")  # evicts b (least recently used)
    assert cache.keys() == ["a", "c"] and cache.nbytes == 8 and cache.get("b") is None
    assert not cache.put("big", "x" * 11) and "big" not in cache
    with pytest.raises(SparsemergeError):
        LRUCache(-1, len)


def test_specs_and_errors(float_store):
    assert parse_spec("a") == {"a": 1.0} and parse_spec(None) == {} and parse_spec("base") == {}
    assert parse_spec("0.5*a + 2e-1*b") == {"a": 0.5, "b": 0.2} and parse_spec({"a": 0, "b": 1}) == {"b": 1.0}
    with pytest.raises(SparsemergeError, match="cannot read"):
        parse_spec("a*0.5")
    switcher = TaskSwitcher(float_store)
    with pytest.raises(SparsemergeError, match="unknown task 'zzz'"):
        switcher.activate("zzz")
    assert switcher.active == ()


def test_lora_task_switches_on_the_kept_slots(float_store, tmp_path):
    from test_deploy_store import _write_lora

    import shutil

    store = TaskStore.init(tmp_path / "s", float_store.base_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    store.add("lo", _write_lora(tmp_path / "lora", name, 64, 64))
    switcher = TaskSwitcher(store)
    base = switcher.model.get_submodule(name[:-7]).to_dense().clone()
    switcher.activate("lo")
    from sparsemerge.merge.lora import LoraAdapter

    delta = LoraAdapter(store.lora_folder("lo")).delta(name)
    got = switcher.model.get_submodule(name[:-7]).to_dense()
    torch.testing.assert_close(got, base + delta * (base != 0), atol=1e-6, rtol=0)
    assert switcher.dropped["lo"] > 0.3
    switcher.base()
    assert torch.equal(switcher.model.get_submodule(name[:-7]).to_dense(), base)
    shutil.rmtree(tmp_path / "s")


def test_a_dense_base_takes_the_whole_update(float_store, tmp_path):
    from sparsemerge.formats.model import pack, unpack

    hf = tmp_path / "hf"
    unpack(float_store.base_dir, hf)
    pack(hf, tmp_path / "bitmask", format="bitmask")  # the same weights, not N:M packed
    store = TaskStore.init(tmp_path / "s", tmp_path / "bitmask")
    store.add("t", make_finetune(hf, tmp_path / "ft", seed=4, scale=0.05), density=0.3, quant="int8")
    switcher = TaskSwitcher(store)
    base = {k: v.clone() for k, v in switcher.model.state_dict().items()}
    switcher.activate("0.5*t")
    tau = store.task_vector("t")
    got = switcher.model.state_dict()
    for name, t in tau.items():
        assert torch.equal(got[name], base[name] + t * 0.5), name
    assert "t" not in switcher.dropped  # nothing projected away
    switcher.base()
    assert all(torch.equal(switcher.model.state_dict()[k], v) for k, v in base.items())
