"""Per-layer sensitivity: each criterion against a hand computation or the real operation."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import mask_for
from sparsemerge.prune import sensitivity as S
from sparsemerge.prune.sensitivity import SensitivityConfig, SensitivityReport, layer_sensitivity
from sparsemerge.prune.sensitivity_plot import format_report, plot_report


class _Block(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, vocab, bias=False)

    def forward(self, hidden, **kwargs):
        return self.proj(hidden)


class TinyLinearLM(nn.Module):
    """logits = E[ids] W^T: one targeted Linear (``layers.0.proj``) inside one block."""

    def __init__(self, vocab: int = 16, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d, vocab)])

    def forward(self, input_ids, labels=None, use_cache=False):
        logits = self.layers[0](self.embed(input_ids))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def _hand_gradient(model: TinyLinearLM, window: torch.Tensor) -> torch.Tensor:
    """dL/dW of the mean token cross-entropy, analytically: sum_t (p_t - y_t) h_t^T / T."""
    with torch.no_grad():
        h = model.embed(window[:-1])  # (T, d)
        p = torch.softmax(h @ model.layers[0].proj.weight.T, dim=-1)  # (T, V)
        y = F.one_hot(window[1:], p.shape[1]).float()
        return (p - y).T @ h / h.shape[0]


def test_taylor_and_fisher_match_hand_computation():
    model = TinyLinearLM()
    calib = torch.randint(0, 16, (3, 12), generator=torch.Generator().manual_seed(0))
    config = SensitivityConfig(criteria=["taylor", "fisher"], patterns=["dense", "2:4", "1:4", "1:8"], progress=False)
    report = layer_sensitivity(model, None, config, calibration=calib)
    (layer,) = report.layers
    assert layer.name == "layers.0.proj" and layer.shape == (16, 8) and layer.block == 0
    w = model.layers[0].proj.weight.detach()
    grads = [_hand_gradient(model, win) for win in calib]
    g_mean = sum(grads) / len(grads)
    fisher_diag = sum(g * g for g in grads) / len(grads)
    for p in ("2:4", "1:4", "1:8"):
        removed = ~mask_for(w.abs(), p)
        assert layer.scores["taylor"][p] == pytest.approx(float((g_mean * w).abs()[removed].sum()), rel=1e-5)
        assert layer.scores["fisher"][p] == pytest.approx(float(0.5 * (fisher_diag * w * w)[removed].sum()), rel=1e-5)
        assert layer.scores["taylor"]["dense"] == 0.0 == layer.scores["fisher"]["dense"]
    # a sparser pattern removes a superset under the magnitude mask: never cheaper
    assert layer.scores["taylor"]["2:4"] < layer.scores["taylor"]["1:4"] < layer.scores["taylor"]["1:8"]


def _layer_inputs(model, name: str, calib: torch.Tensor) -> torch.Tensor:
    xs = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    handle.remove()
    return torch.cat(xs).double()


def test_obs_equals_sparsegpt_reconstruction_error():
    from sparsemerge.prune.sparsegpt import sparsegpt_prune

    model = make_tiny_llama()
    calib = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    config = SensitivityConfig(criteria=["obs"], patterns=["2:4", "1:4"], progress=False, blocksize=32)
    report = layer_sensitivity(model, None, config, calibration=calib)
    by_name = {lay.name: lay for lay in report.layers}
    # q_proj is scored stacked with k/v (one shared H); down_proj alone: both must equal the error
    # of pruning that layer by itself with SparseGPT, measured on its real inputs
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        X = _layer_inputs(model, name, calib)
        W = dict(model.named_modules())[name].weight.detach()
        H = (2.0 / X.shape[0]) * (X.T @ X)
        for p in ("2:4", "1:4"):
            new = sparsegpt_prune(W, H.float(), p, dampening=0.01, blocksize=32)
            err = float(((W.double() - new.double()) @ X.T).pow(2).sum() / X.shape[0])
            assert by_name[name].scores["obs"][p] == pytest.approx(err, rel=2e-3)
    assert all(lay.scores["obs"]["1:4"] > lay.scores["obs"]["2:4"] for lay in report.layers)


class TinyParallelLM(nn.Module):
    """logits = head(sum_k layers[k].proj(E[ids])): branches that do not feed one another, so
    scaling one branch up scales only its own pruning error."""

    def __init__(self, branches: int = 4, vocab: int = 32, d: int = 16, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d, d) for _ in range(branches)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, labels=None, use_cache=False):
        h = self.embed(input_ids)
        return SimpleNamespace(logits=self.head(sum(block(h) for block in self.layers)), loss=None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measured_ranks_a_scaled_up_layer_as_most_sensitive(seed):
    model = TinyParallelLM(seed=seed)
    with torch.no_grad():
        model.layers[2].proj.weight.mul_(4.0)
    # held-out text sampled from the dense model itself: then the expected loss increase of any
    # change is KL(dense || changed) > 0, not noise around a random text's loss
    gen = torch.Generator().manual_seed(seed)
    held = torch.randint(0, 32, (8, 1), generator=gen)
    with torch.no_grad():
        for _ in range(63):
            probs = torch.softmax(model(input_ids=held[:, -1:]).logits[:, -1], dim=-1)
            held = torch.cat([held, torch.multinomial(probs, 1, generator=gen)], dim=1)
    config = SensitivityConfig(criteria=["measured"], patterns=["4:8", "2:4", "1:4"], progress=False)
    report = layer_sensitivity(model, None, config, heldout=held)
    for p in config.patterns:
        measured = {lay.name: lay.scores["measured"][p] for lay in report.layers}
        assert max(measured, key=measured.get) == "layers.2.proj", (p, measured)


def test_measured_restores_weights_bit_exactly_and_matches_by_hand():
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    held = torch.randint(0, 384, (3, 32), generator=torch.Generator().manual_seed(2))
    config = SensitivityConfig(criteria=["measured"], patterns=["dense", "2:4", "1:4"], progress=False)
    report = layer_sensitivity(model, None, config, heldout=held)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact restore
    assert report.base_loss == pytest.approx(S.mean_loss(model, held))
    # one entry by hand: prune only that layer, evaluate, restore
    name = "model.layers.1.mlp.up_proj"
    module = dict(model.named_modules())[name]
    saved = module.weight.detach().clone()
    with torch.no_grad():
        module.weight.mul_(mask_for(saved.abs(), "1:4"))
    by_hand = S.mean_loss(model, held) - report.base_loss
    with torch.no_grad():
        module.weight.copy_(saved)
    scores = {lay.name: lay.scores["measured"] for lay in report.layers}
    assert scores[name]["1:4"] == pytest.approx(by_hand, abs=1e-7)
    assert all(s["dense"] == 0.0 for s in scores.values())


def test_measured_restores_weights_when_interrupted(monkeypatch):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    real = S.mean_loss

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # inside a trial, with a layer pruned
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "mean_loss", failing)
    held = torch.randint(0, 384, (2, 16))
    with pytest.raises(KeyboardInterrupt):
        layer_sensitivity(model, None, SensitivityConfig(criteria=["measured"], patterns=["2:4"], progress=False), heldout=held)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measured_layer_limits_and_sparsegpt_method():
    model = make_tiny_llama()
    calib = torch.randint(0, 384, (2, 32))
    held = torch.randint(0, 384, (2, 32))
    config = SensitivityConfig(criteria=["measured"], patterns=["2:4"], layer_regex=r"mlp\.", max_layers=2,
                               measured_method="sparsegpt", progress=False)
    report = layer_sensitivity(model, None, config, calibration=calib, heldout=held)
    with_scores = [lay.name for lay in report.layers if "measured" in lay.scores]
    assert with_scores == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    with pytest.raises(SparsemergeError, match="missing"):
        report.scores("measured")


def test_report_json_roundtrip_and_outputs(tmp_path):
    model = make_tiny_llama()
    calib = torch.randint(0, 384, (2, 16))
    report = layer_sensitivity(model, None, SensitivityConfig(criteria=["taylor"], patterns=["4:8", "2:4"], progress=False), calib)
    path = report.save(tmp_path / "s.json")
    loaded = SensitivityReport.load(path)
    assert loaded.to_json() == report.to_json()
    with pytest.raises(SparsemergeError, match="already exists"):
        report.save(path)
    assert "model.layers.1.mlp.down_proj" in format_report(report)
    png = plot_report(report, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_rejected():
    with pytest.raises(Exception, match="unknown criteria"):
        SensitivityConfig(criteria=["hessian"])
    with pytest.raises(ValueError, match="0 < N < M"):
        SensitivityConfig(patterns=["3:2"])
    model = make_tiny_llama(hidden=64, intermediate=96)  # down_proj input 96: no 64-wide groups
    targets, skipped = S.sensitivity_targets(model, SensitivityConfig(patterns=["2:4", "16:64"]))
    assert "model.layers.0.mlp.down_proj" in dict(skipped) and all("down_proj" not in t.name for t in targets)
