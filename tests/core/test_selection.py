"""sparsemerge.selection: the include/exclude layer filter, its defaults, and module replacement,
and that every user (prune, pack, kernels, merge, train) goes through it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerFilter, compile_regexes, replace_module

# (module name, selected by the defaults) - hand-picked from Llama, GPT-2, GPT-NeoX and BERT names
DEFAULT_CASES = [
    ("model.layers.0.mlp.up_proj", True),
    ("model.layers.11.self_attn.q_proj", True),
    ("transformer.h.3.attn.c_attn", True),
    ("gpt_neox.layers.2.mlp.dense_h_to_4h", True),
    ("bert.encoder.layer.1.attention.self.query", True),
    ("model.decoder.layers.0.fc1", True),
    ("model.layers.0.input_layernorm", False),  # exclude: norm
    ("model.layers.0.post_attention_layernorm", False),
    ("model.norm", False),
    ("lm_head", False),
    ("model.embed_tokens", False),
    ("transformer.wte", False),
    ("embed_out", False),
    ("score", False),  # outside the blocks: not included
    ("model.layers.mlp", False),  # no block index
]


@pytest.mark.parametrize("name, selected", DEFAULT_CASES)
def test_default_filter(name: str, selected: bool) -> None:
    assert LayerFilter.default()(name) is selected
    assert LayerFilter(DEFAULT_INCLUDE, DEFAULT_EXCLUDE)(name) is selected


def test_old_homes_reexport_the_same_defaults() -> None:
    from sparsemerge.kernels import sparse_linear
    from sparsemerge.prune import config

    assert config.DEFAULT_INCLUDE is DEFAULT_INCLUDE and config.DEFAULT_EXCLUDE is DEFAULT_EXCLUDE
    assert sparse_linear.DEFAULT_INCLUDE is DEFAULT_INCLUDE and sparse_linear.DEFAULT_EXCLUDE is DEFAULT_EXCLUDE
    # configs get copies: changing one config's list leaves the shared defaults alone
    cfg = config.PruneConfig()
    cfg.include.append("x")
    assert config.PruneConfig().include == DEFAULT_INCLUDE and "x" not in DEFAULT_INCLUDE
    assert sparse_linear.SparsifyConfig().include == DEFAULT_INCLUDE


def test_include_none_empty_and_exclude() -> None:
    assert LayerFilter()("anything")  # no include list: everything
    assert not LayerFilter([])("anything")  # empty include list: nothing
    only_mlp = LayerFilter([r"mlp\."], [r"down"])
    assert only_mlp("layers.0.mlp.up_proj")
    assert not only_mlp("layers.0.mlp.down_proj")  # exclude wins over include
    assert not only_mlp("layers.0.self_attn.q_proj")
    assert LayerFilter(None, ["lm_head"])("layers.0.q") and not LayerFilter(None, ["lm_head"])("lm_head")


def test_weight_names() -> None:
    f = LayerFilter.default()
    assert f.weight("model.layers.0.mlp.up_proj.weight")
    assert not f.weight("model.layers.0.mlp.up_proj.bias")  # only weights are targets
    assert not f.weight("model.layers.0.input_layernorm.weight")
    assert not f.weight("lm_head.weight")


@pytest.mark.parametrize("include, exclude, what", [(["layers.(0"], [], "include"), ([".*"], ["[norm"], "exclude")])
def test_bad_regex_is_named(include: list[str], exclude: list[str], what: str) -> None:
    bad = include[0] if what == "include" else exclude[0]
    with pytest.raises(SparsemergeError, match=rf"bad {what} regex {bad!r}".replace("[", r"\[").replace("(", r"\(")):
        LayerFilter(include, exclude)
    with pytest.raises(SparsemergeError, match="regexes must be strings"):
        compile_regexes([3], "include")  # type: ignore[list-item]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])}), nn.Linear(4, 2))


def test_replace_module_nested_and_top_level() -> None:
    net = _net()
    old = net[0]["blocks"][1]
    new = nn.Identity()
    assert replace_module(net, "0.blocks.1", new) is old
    assert net[0]["blocks"][1] is new and dict(net.named_modules())["0.blocks.1"] is new
    head = nn.Linear(4, 2)
    replace_module(net, "1", head)
    assert net[1] is head
    assert [n for n, _ in net.named_modules()] == ["", "0", "0.blocks", "0.blocks.0", "0.blocks.1", "1"]


@pytest.mark.parametrize("name, match", [("", "root module"), ("0.blocks.7", "no submodule '0.blocks.7'"), ("9.x", "no submodule '9'")])
def test_replace_module_errors(name: str, match: str) -> None:
    with pytest.raises(SparsemergeError, match=match):
        replace_module(_net(), name, nn.Identity())


# ------------------------------------------------------------------ every user goes through it
def test_users_reject_a_bad_regex_by_name(tiny_llama) -> None:
    """prune, sparsify, pack and the fixed-mask trainer all report the offending regex."""
    from sparsemerge.formats.layout import _targets
    from sparsemerge.formats.model import PackConfig
    from sparsemerge.kernels.sparse_linear import SparsifyConfig, sparsify_
    from sparsemerge.prune.api import prune_
    from sparsemerge.train.masked import FixedMasks

    model = tiny_llama
    with pytest.raises(SparsemergeError, match=r"bad include regex 'layers\.\('"):
        prune_(model, {"include": ["layers.("], "progress": False})
    with pytest.raises(SparsemergeError, match=r"bad layer_patterns regex"):
        prune_(model, {"layer_patterns": {"mlp(": "1:4"}, "progress": False})
    with pytest.raises(SparsemergeError, match=r"bad exclude regex '\['"):
        sparsify_(model, SparsifyConfig(exclude=["["]))
    with pytest.raises(SparsemergeError, match=r"bad include regex"):
        _targets(PackConfig(include=["("]))
    with pytest.raises(SparsemergeError, match=r"bad exclude regex"):
        FixedMasks(model, exclude=["("])


def test_pack_targets_fall_back_to_defaults() -> None:
    """PackConfig's include/exclude: None or [] means the defaults (unchanged behaviour)."""
    from sparsemerge.formats.layout import _targets
    from sparsemerge.formats.model import PackConfig

    for cfg in (PackConfig(), PackConfig(include=[], exclude=[])):
        targeted = _targets(cfg)
        for name, selected in DEFAULT_CASES:
            assert targeted(name + ".weight") is selected
    only_q = _targets(PackConfig(include=[r"q_proj"], exclude=[r"layers\.1\."]))
    assert only_q("model.layers.0.self_attn.q_proj.weight")
    assert not only_q("model.layers.1.self_attn.q_proj.weight")
    assert not only_q("model.layers.0.mlp.up_proj.weight")


def test_pattern_projector_targets_the_default_layers() -> None:
    from sparsemerge.merge.sparsity import PatternProjector

    proj = PatternProjector("2:4")
    for name, selected in DEFAULT_CASES:
        assert proj.targets(name + ".weight") is selected
        assert not proj.targets(name + ".bias")


def test_moe_routers_are_never_targeted_by_default():
    from sparsemerge.selection import LayerFilter

    default = LayerFilter.default()
    assert not default("model.layers.3.mlp.gate") and not default("model.layers.3.mlp.shared_expert_gate")
    assert default("model.layers.3.mlp.gate_proj") and default("model.layers.3.mlp.experts.gate_up_proj")
    assert default("model.layers.3.mlp.shared_expert.gate_proj")
