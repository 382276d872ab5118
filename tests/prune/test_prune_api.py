import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern
from sparsemerge.prune import METHODS, PruneConfig
from sparsemerge.prune.api import prune_
from sparsemerge.prune.select import find_blocks, select_targets


def _linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_default_targets_skip_embeddings_head_and_norms():
    model = make_tiny_llama()
    targets, skipped = select_targets(model, PruneConfig())
    names = {t.name for t in targets}
    assert len(names) == 2 * 7 and not skipped  # q,k,v,o,gate,up,down per block
    assert all(".layers." in n for n in names)
    assert "lm_head" not in names


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "2:8", "16:32", "block8:0.5", "unstructured:0.7"])
def test_magnitude_prune_conforms(pattern):
    model = make_tiny_llama()
    embed_before = model.model.embed_tokens.weight.clone()
    report = prune_(model, {"pattern": pattern})
    for t in select_targets(model, PruneConfig(pattern=pattern))[0]:
        assert check_pattern(t.weight, pattern).ok
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # dense parts untouched
    assert report.sparsity == pytest.approx(1 - {"2:4": 0.5, "1:4": 0.25, "4:8": 0.5, "2:8": 0.25, "16:32": 0.5}.get(pattern, 0.5 if "block" in pattern else 0.3), abs=0.01)


def test_magnitude_keeps_largest():
    model = make_tiny_llama()
    before = {n: w.detach().clone() for n, w in _linear_weights(model).items()}
    prune_(model, {"pattern": "2:4"})
    name = "model.layers.0.mlp.up_proj"
    w0, w1 = before[name], _linear_weights(model)[name]
    groups0, kept = w0.abs().reshape(-1, 4), (w1 != 0).reshape(-1, 4)
    assert (torch.where(kept, groups0, torch.inf).min(1).values >= torch.where(~kept, groups0, -torch.inf).max(1).values).all()
    assert torch.equal(w1[w1 != 0], w0[w1 != 0])  # kept weights keep their values


def test_global_unstructured_spreads_sparsity_unevenly():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(10)  # a layer of large weights keeps more
    report = prune_(model, {"pattern": "unstructured-global:0.6"})
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)
    per_layer = {r.name: r.sparsity for r in report.layers}
    assert per_layer["model.layers.0.mlp.up_proj"] < 0.1 < per_layer["model.layers.1.mlp.up_proj"]


def test_layer_overrides_and_include_exclude():
    model = make_tiny_llama()
    report = prune_(model, {"pattern": "2:4", "layer_patterns": {r"mlp\.": "1:4"}, "exclude": [r"self_attn\.v_proj", "norm"]})
    patterns = {r.name: r.pattern for r in report.layers}
    assert patterns["model.layers.0.mlp.down_proj"] == "1:4"
    assert patterns["model.layers.0.self_attn.q_proj"] == "2:4"
    assert "model.layers.0.self_attn.v_proj" not in patterns


def test_dense_layer_pattern_keeps_the_layer_untouched():
    model = make_tiny_llama()
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    config = {"pattern": "2:4", "layer_patterns": {r"^model\.layers\.1\.mlp\.down_proj$": "dense", r"q_proj": "1:4"}}
    report = prune_(model, config)
    names = {r.name for r in report.layers}
    assert "model.layers.1.mlp.down_proj" not in names and "model.layers.0.mlp.down_proj" in names
    assert ("model.layers.1.mlp.down_proj", "dense by recipe (layer_patterns)") in report.skipped
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
    assert check_pattern(model.model.layers[0].self_attn.q_proj.weight, "1:4").ok
    with pytest.raises(Exception, match="unknown sparsity pattern"):
        PruneConfig(layer_patterns={"x": "sparse"})


def test_indivisible_input_dimension_is_skipped_and_reported():
    model = make_tiny_llama(hidden=64, intermediate=96)  # down_proj input 96: 96 % 64 != 0
    report = prune_(model, {"pattern": "16:64"})
    skipped = dict(report.skipped)
    assert "model.layers.0.mlp.down_proj" in skipped and "not divisible" in skipped["model.layers.0.mlp.down_proj"]
    assert (model.model.layers[0].mlp.down_proj.weight != 0).all()  # never silently mangled


def test_nan_weights_rejected():
    model = make_tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(SparsemergeError, match="layers.1.mlp.up_proj.*NaN"):
        prune_(model, {"pattern": "2:4"})
    assert torch.equal(before, model.model.layers[0].mlp.up_proj.weight)  # nothing pruned


def test_unknown_method_lists_known():
    with pytest.raises(SparsemergeError, match="known pruning methods: .*magnitude"):
        prune_(make_tiny_llama(), {"method": "nope"})


def test_config_rejects_unknown_keys_and_bad_pattern():
    with pytest.raises(Exception):
        PruneConfig(patern="2:4")
    with pytest.raises(Exception):
        PruneConfig(pattern="5:4")


@pytest.mark.parametrize("method", ["gradient", "taylor"])
def test_gradient_methods_use_calibration(method, tiny_tokenizer):
    model = make_tiny_llama()
    calib = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_(model, {"method": method, "pattern": "2:4", "progress": False}, calibration=calib)
    for t in select_targets(model, PruneConfig())[0]:
        assert check_pattern(t.weight, "2:4").ok
    assert all(p.grad is None for p in model.parameters())  # no gradients left behind


def test_gradient_scores_follow_formula():
    from sparsemerge.prune.gradient import GradientAware, calibration_gradients

    model = make_tiny_llama()
    calib = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    targets, _ = select_targets(model, PruneConfig())
    grads = calibration_gradients(model, targets, calib, progress=False)
    config = PruneConfig(method="gradient", gamma=0.5)
    scores = GradientAware().scores(model, targets, config, calib)
    t = targets[0]
    w, g = t.weight.detach().abs(), grads[t.name].abs()
    assert torch.allclose(scores[t.name], w + 0.5 * (w.mean() / g.mean()) * g)
    # the gradient is the one of the mean LM loss
    model.zero_grad()
    model(input_ids=calib, labels=calib).loss.backward()
    assert torch.allclose(grads[t.name], t.weight.grad, atol=1e-6)
    # gamma = 0 is plain magnitude
    zero = GradientAware().scores(model, targets, PruneConfig(method="gradient", gamma=0.0), calib)
    assert torch.equal(zero[t.name], w)


class _LinearLoss(torch.nn.Module):
    """A model whose loss gradient is known by hand: x_t = one_hot(token_t, 4), y_t = W x_t,
    L = mean_t (c . y_t), so dL/dW[i, j] = c_i * (share of tokens equal to j)."""

    def __init__(self, weight, c):
        super().__init__()
        self.proj = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)
        self.c = c

    def forward(self, input_ids, labels=None, use_cache=False):
        from types import SimpleNamespace

        y = self.proj(torch.nn.functional.one_hot(input_ids, 4).float())
        return SimpleNamespace(loss=(y * self.c).sum(-1).mean())


def test_taylor_score_is_abs_weight_times_mean_gradient_by_hand():
    """taylor = |W * dL/dW| (first-order Taylor term of the loss change when w -> 0, Molchanov
    et al. 2019), dL/dW the gradient of the mean loss over the calibration windows."""
    from sparsemerge.patterns import parse_pattern
    from sparsemerge.prune.base import Target
    from sparsemerge.prune.gradient import Taylor

    weight = torch.tensor([[0.5, -1.0, 2.0, -4.0], [3.0, 0.25, -0.5, 1.5]])
    model = _LinearLoss(weight, torch.tensor([1.0, -2.0]))
    calib = torch.tensor([[0, 0, 1, 3], [2, 0, 1, 1]])  # token shares: 0: 3/8, 1: 3/8, 2: 1/8, 3: 1/8
    targets = [Target("proj", model.proj, parse_pattern("2:4"))]
    scores = Taylor().scores(model, targets, PruneConfig(method="taylor", progress=False), calib)
    # grad = [[3/8, 3/8, 1/8, 1/8], [-6/8, -6/8, -2/8, -2/8]]; |W * grad| (all exact in float32):
    assert scores["proj"].tolist() == [[0.1875, 0.375, 0.25, 0.5], [2.25, 0.1875, 0.125, 0.375]]
    # 2:4 keeps the two largest scores per group: row 0 keeps columns 1, 3 (magnitude would keep 2, 3)
    Taylor().prune(model, targets, PruneConfig(method="taylor", progress=False), calib)
    assert model.proj.weight.tolist() == [[0.0, -1.0, 0.0, -4.0], [3.0, 0.0, 0.0, 1.5]]
    assert model.proj.weight.grad is None


def test_gradient_method_needs_tokenizer_or_calibration():
    with pytest.raises(SparsemergeError, match="calibration"):
        prune_(make_tiny_llama(), {"method": "gradient"})


def test_find_blocks():
    model = make_tiny_llama(layers=3)
    name, blocks = find_blocks(model)
    assert name == "model.layers" and len(blocks) == 3


def test_registry_has_issue_2_methods():
    assert {"magnitude", "gradient", "taylor"} <= set(METHODS.names())
