"""Sparse training: schedules, masks that change (gradual, progressive, SR-STE, dynamic),
regularizers, the cached top-k teacher, recipes, kill -9 + resume, and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern, nm_mask
from sparsemerge.patterns import NM
from sparsemerge.train.distill import kd_loss
from sparsemerge.train.regularizers import l1_penalty, nm_penalty, nm_penalty_l0
from sparsemerge.train.schedules import Constant, CubicRamp, ExponentialN, ProgressiveNM, Target
from sparsemerge.train.sparse_masks import MaskController, as_matrix, from_matrix, scheduled_mask, trainable_weights
from sparsemerge.train.sparse_train import StageConfig, run_stage
from sparsemerge.train.teacher_cache import TeacherCache, WindowPool, topk_kd_loss

NM24 = NM(2, 4)


# ----------------------------------------------------------------------------- schedules


def test_cubic_ramp_matches_zhu_gupta():
    ramp = CubicRamp(NM24, start=10, end=110)
    assert ramp.fraction(0) == 0.0 and ramp.fraction(10) == 0.0 and ramp.fraction(110) == 1.0 and ramp.fraction(500) == 1.0
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 with s_i = 0, s_f = 1: at the midpoint 1 - 0.5^3
    assert ramp.fraction(60) == pytest.approx(0.875)
    assert ramp.fraction(35) == pytest.approx(1 - 0.75**3)
    with pytest.raises(SparsemergeError, match="start < end"):
        CubicRamp(NM24, 5, 5)


def test_progressive_schedule_stages_and_errors():
    sched = ProgressiveNM.even(["dense", "4:8", "2:4"], 30)
    assert [str(sched.target(t)) for t in (0, 9, 10, 19, 20, 29)] == ["dense", "dense", "4:8", "4:8", "2:4", "2:4"]
    sched = ProgressiveNM.even(["2:4", "2:8", "1:8"], 9)  # the chapter's 10.2.6 example
    assert [str(sched.target(t)) for t in (0, 3, 6)] == ["2:4", "2:8", "1:8"]
    with pytest.raises(SparsemergeError, match="must not get denser"):
        ProgressiveNM.even(["2:8", "2:4"], 10)
    with pytest.raises(SparsemergeError, match="last stage"):
        ProgressiveNM.even(["2:4", "dense"], 10)


def test_exponential_n_follows_the_chapter_formula():
    sched = ExponentialN(m=8, n_init=8, n_final=2, lam=0.1, exact_from=50)
    import math

    for t in (0, 5, 13, 30):
        assert sched.n_at(t) == round(2 + 6 * math.exp(-0.1 * t))
    assert sched.target(0).dense and str(sched.target(13)) == f"{sched.n_at(13)}:8" and sched.n_at(50) == 2


# ----------------------------------------------------------------------------- masks


def test_scheduled_mask_removes_the_smallest_of_the_patterns_removals_first():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 8.0, 0.5, 7.0, 6.0]])
    exact = nm_mask(scores, 2, 4)
    assert torch.equal(scheduled_mask(scores, Target(NM24, 1.0)), exact)
    assert scheduled_mask(scores, Target(None, 0.0)).all()
    # removals of 2:4: {2.0, 1.0} and {0.5, 6.0}; half of them = the two smallest: 0.5 and 1.0
    half = scheduled_mask(scores, Target(NM24, 0.5))
    assert half.tolist() == [[True, True, True, False, True, False, True, True]]
    assert (half | ~exact).all()  # a superset of the exact mask


def test_conv_weights_group_along_input_channels():
    w = torch.randn(6, 8, 3, 3)
    m = as_matrix(w)
    assert m.shape == (6, 72) and torch.equal(from_matrix(m, w.shape), w)
    assert torch.equal(m[2, 5 * 8 : 6 * 8], w[2, :, 5 // 3, 5 % 3])  # kernel position 5: the 8 input channels
    mask = from_matrix(nm_mask(m.abs(), 2, 4), w.shape)
    # every run of 4 input channels at one kernel position keeps exactly 2
    assert (mask.reshape(6, 2, 4, 3, 3).sum(2) == 2).all()


def test_trainable_weights_skip_head_embedding_and_indivisible_layers():
    model = make_tiny_llama()
    names = set(trainable_weights(model, pattern=NM24))
    assert "lm_head" not in names and not any("embed" in n for n in names)
    assert len(names) == 2 * 7
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    assert set(trainable_weights(net, pattern=NM24)) == {"2", "4"}  # the 1-channel input conv stays dense


def _toy_regression(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    y = torch.randn(64, 8)
    return net, x, y


def _run(net, x, y, **stage):
    weights = trainable_weights(net, pattern=NM(2, 4))
    config = StageConfig(**{"lr": 1e-2, "warmup_steps": 0, **stage})
    params = [p for p in net.parameters()]

    def loss_fn(step):
        return nn.functional.mse_loss(net(x), y), x.shape[0]

    return run_stage(net, params, weights, config, loss_fn, progress=False)


@pytest.mark.parametrize("method", ["oneshot", "gradual", "progressive", "srste", "dynamic"])
def test_every_method_ends_exactly_on_its_pattern(method):
    net, x, y = _toy_regression()
    report, controller = _run(net, x, y, method=method, steps=24, update_every=2, progressive=["dense", "4:8", "2:4"])
    assert report.violations == 0 and report.final_density == 0.5
    for w in trainable_weights(net, pattern=NM24).values():
        assert check_pattern(w.detach(), "2:4").ok
    if method in ("gradual", "progressive", "srste", "dynamic"):
        assert len(report.mask_updates) > 2


def test_exponential_progressive_stage_walks_n_down_to_the_pattern():
    net, x, y = _toy_regression()
    report, _ = _run(net, x, y, method="progressive", pattern="2:8", exp_n_init=8, exp_lambda=0.2, steps=30, update_every=1)
    targets = [u["target"] for u in report.mask_updates]
    assert targets[0] == "dense" and targets[-1] == "2:8"
    walked = list(dict.fromkeys(t for t in targets if t != "dense"))  # distinct, in order
    assert walked == [f"{n}:8" for n in range(7, 1, -1)]  # N(t) = 2 + 6 e^(-0.2 t) rounds through 7..2
    assert report.final_density == 0.25 and report.violations == 0


def test_gradual_density_follows_the_cubic_ramp():
    net, x, y = _toy_regression()
    report, _ = _run(net, x, y, method="gradual", steps=40, update_every=4, ramp_start=0.0, ramp_end=0.5)
    ramp = CubicRamp(NM24, 0, 20)
    for update in report.mask_updates[:-1]:
        assert update["density"] == pytest.approx(1 - 0.5 * ramp.fraction(update["step"]), abs=0.01)


def test_hard_masks_keep_pruned_weights_zero_and_their_gradients_masked():
    net, x, y = _toy_regression()
    weights = trainable_weights(net, pattern=NM24)
    controller = MaskController(weights, Constant(NM24), update_every=0)
    opt = torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(5):
        controller.before_forward(step)
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        controller.after_backward()
        for name, w in weights.items():
            assert (w.grad[~controller.masks[name]] == 0).all()
        opt.step()
        controller.after_step()
        assert controller.violations() == 0


def test_srste_forward_uses_masked_weights_and_decays_the_pruned_ones():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    net = nn.Sequential(lin)
    weights = trainable_weights(net, pattern=NM24)
    decay = 0.5
    controller = MaskController(weights, Constant(NM24), mode="srste", update_every=1, srste_decay=decay)
    x = torch.randn(3, 8)
    dense = lin.weight.detach().clone()
    controller.before_forward(0)
    mask = controller.masks["0"]
    assert torch.equal(mask, nm_mask(dense.abs(), 2, 4))
    out = net(x)
    torch.testing.assert_close(out, x @ (dense * mask).T)  # forward through W . M
    out.sum().backward()
    controller.after_backward()
    assert torch.equal(lin.weight.detach(), dense)  # dense weights back for the optimizer
    # straight-through gradient of the sparse forward + lambda_W (1 - M) . W (SR-STE eq. 6)
    expect = torch.ones(3, 4).T @ x + decay * dense * ~mask
    torch.testing.assert_close(lin.weight.grad, expect)


def test_dynamic_reallocation_revives_a_weight_with_a_large_gradient():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.1, 0.05]]))
    net = nn.Sequential(lin)
    controller = MaskController(trainable_weights(net, pattern=NM24), Constant(NM24), update_every=1, score="gradient", gamma=1.0)
    controller.before_forward(0)
    assert controller.masks["0"].tolist() == [[True, True, False, False]]
    lin.weight.grad = torch.tensor([[0.0, 0.0, 0.0, 10.0]])  # the pruned 4th weight matters a lot
    controller.after_backward()
    update = controller.before_forward(1)
    # score = |W| + gamma * c * |g| with c = mean|W| / mean|g| = 0.475 / 2.5: 4th = 0 + 1.9 beats 0.9 + 0
    assert controller.masks["0"].tolist() == [[True, False, False, True]]
    assert update.changed == 2 and lin.weight[0, 3] == 0.0  # comes back from zero


# ----------------------------------------------------------------------------- regularizers


def test_nm_regularizer_is_zero_exactly_when_groups_satisfy_the_pattern():
    w = torch.tensor([[3.0, -0.5, 2.0, 0.25, 0.0, 0.0, 1.0, -4.0]], requires_grad=True)
    # bottom-2 magnitudes per group: {0.25, 0.5} and {0, 0} -> 0.75 / 8 weights
    assert float(nm_penalty([w], NM24).detach()) == pytest.approx(0.75 / 8)
    assert nm_penalty_l0([w], NM24) == 4  # the chapter's (||g||_0 - N)^2: (4 - 2)^2 + 0
    nm_penalty([w], NM24).backward()
    assert (w.grad != 0).tolist() == [[False, True, False, True, False, False, False, False]]
    sparse = (w.detach() * nm_mask(w.detach().abs(), 2, 4))
    assert float(nm_penalty([sparse], NM24)) == 0.0 and nm_penalty_l0([sparse], NM24) == 0
    assert float(l1_penalty([w]).detach()) == pytest.approx(10.75 / 8)


def test_nm_regularizer_moves_weights_towards_the_pattern():
    net, x, y = _toy_regression()
    weights = trainable_weights(net, pattern=NM24)
    before = float(nm_penalty(weights, NM24))
    _run(net, x, y, method="dense", steps=30, nm_reg=5.0, kd_weight=0.0)
    assert float(nm_penalty(weights, NM24)) < 0.5 * before


# ----------------------------------------------------------------------------- teacher cache


def test_topk_kd_with_the_whole_vocabulary_equals_full_kd_and_truncation_is_close():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 50), torch.randn(2, 5, 50) * 3
    lse2, lse1 = torch.logsumexp(t / 2, -1), torch.logsumexp(t, -1)
    full = torch.topk(t, 50, dim=-1)
    torch.testing.assert_close(topk_kd_loss(s, full.values, full.indices, lse2, 2.0), kd_loss(s, t, 2.0))
    top = torch.topk(t, 20, dim=-1)
    assert float(topk_kd_loss(s, top.values, top.indices, lse1, 1.0)) == pytest.approx(float(kd_loss(s, t, 1.0)), rel=0.1)
    # a student equal to the teacher has zero loss at any k (a renormalised top-k target would not)
    for k in (1, 5, 20):
        top = torch.topk(t, k, dim=-1)
        assert float(topk_kd_loss(t, top.values, top.indices, lse2, 2.0)) == pytest.approx(0.0, abs=1e-5)
    # the rest bucket by hand for one token, k = 1: p = (p_1, 1 - p_1), q = (q_1, 1 - q_1)
    p1 = torch.softmax(t[0, 0] / 2, -1)[full.indices[0, 0, 0]]
    q1 = torch.softmax(s[0, 0] / 2, -1)[full.indices[0, 0, 0]]
    expect = 4 * (p1 * (p1 / q1).log() + (1 - p1) * ((1 - p1) / (1 - q1)).log())
    top1 = torch.topk(t[:1, :1], 1, dim=-1)
    got = topk_kd_loss(s[:1, :1], top1.values, top1.indices, lse2[:1, :1], 2.0)
    torch.testing.assert_close(got, expect)


def test_window_pool_batches_are_a_function_of_the_step():
    ids = torch.arange(1000)
    pool = WindowPool.draw(ids, 16, 10, seed=3)
    again = WindowPool.draw(ids, 16, 10, seed=3)
    assert torch.equal(pool.windows, again.windows)
    first_epoch = torch.cat([pool.indices(s, 2) for s in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(10))  # every window once per epoch
    assert torch.equal(pool.indices(7, 2), again.indices(7, 2))


def test_teacher_cache_is_saved_reused_and_rebuilt_when_stale(tmp_path):
    teacher = make_tiny_llama()
    pool = WindowPool.draw(torch.randint(0, 384, (400,)), 16, 4, seed=0)
    path = tmp_path / "cache.pt"
    cache = TeacherCache.build(teacher, pool, 8, path, progress=False)
    with torch.no_grad():
        logits = teacher(input_ids=pool.windows).logits
    torch.testing.assert_close(cache.values, torch.topk(logits, 8, -1).values)
    torch.testing.assert_close(cache.batch(torch.tensor([1]), 2.0)[2], torch.logsumexp(logits[1:2] / 2, -1))
    with pytest.raises(SparsemergeError, match="temperatures"):
        cache.batch(torch.tensor([0]), 1.0)
    mtime = path.stat().st_mtime_ns
    assert TeacherCache.build(teacher, pool, 8, path, progress=False).key == cache.key and path.stat().st_mtime_ns == mtime
    with torch.no_grad():
        teacher.model.norm.weight.mul_(2)
    assert TeacherCache.build(teacher, pool, 8, path, progress=False).key != cache.key  # other weights: rebuilt
    path.write_bytes(b"truncated")
    assert TeacherCache.build(teacher, pool, 8, path, progress=False).values.shape == (4, 16, 8)


# ----------------------------------------------------------------------------- recipes and the CLI


def _recipe(model_dir, text, stages, **extra):
    return {"model": str(model_dir), "text": str(text), "eval": str(text), "eval_windows": 2, "eval_seqlen": 64,
            "seqlen": 32, "batch_size": 2, "topk": 16, "checkpoint_every": 5, "threads": 1, "stages": stages, **extra}


THREE_STAGES = [
    {"method": "dense", "steps": 6, "l1": 1e-3, "lr": 1e-3, "warmup_steps": 2},
    {"method": "gradual", "pattern": "2:4", "steps": 30, "update_every": 3, "lr": 1e-3, "warmup_steps": 2},
    {"method": "fixed", "pattern": "2:4", "steps": 10, "lr": 5e-4, "warmup_steps": 0},
]


def test_three_stage_recipe_distils_towards_the_teacher_and_packs(tmp_path, tiny_llama_dir, text_file):
    from sparsemerge.cli.main import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, THREE_STAGES)))
    out = tmp_path / "trained"
    assert main(["train", str(recipe), str(out), "--no-progress"]) == 0
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    assert record["pattern"] == "2:4" and record["overall_sparsity"] == 0.5 and len(record["layers"]) == 14
    train = json.loads((out / "sparsemerge_train.json").read_text())
    assert [s["method"] for s in train["stages"]] == ["dense", "gradual", "fixed"]
    assert train["stages"][1]["mask_updates"] and all(s["tokens_per_s"] > 0 for s in train["stages"])
    assert not (Path(str(out.resolve()) + ".work") / "checkpoint.pt").exists()  # removed after success
    assert main(["check", str(out), "--quiet"]) == 0  # each layer against its recorded pattern
    packed = tmp_path / "packed"
    assert main(["pack", str(out), str(packed), "--quant", "int8"]) == 0


def test_train_refuses_an_existing_output_and_bad_recipes(tmp_path, tiny_llama_dir, text_file, capsys):
    from sparsemerge.cli.main import main

    out = tmp_path / "exists"
    out.mkdir()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, THREE_STAGES)))
    assert main(["train", str(recipe), str(out)]) != 0
    assert "exists" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, [{"method": "srste", "pattern": "5:4"}])))
    assert main(["train", str(recipe), str(tmp_path / "o2")]) != 0
    assert "N:M" in capsys.readouterr().err
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, [{"method": "dense", "steps": 2}])))
    assert main(["train", str(recipe), str(tmp_path / "o3")]) != 0
    assert "not be sparse" in capsys.readouterr().err
    recipe.write_text("model: [unclosed")
    assert main(["train", str(recipe), str(tmp_path / "o4")]) != 0
    assert "not valid YAML" in capsys.readouterr().err


def _train_cmd(recipe, out):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), OMP_NUM_THREADS="1")
    return [sys.executable, "-c", "import sys; from sparsemerge.cli.main import main; sys.exit(main(sys.argv[1:]))",
            "train", str(recipe), str(out), "--no-progress"], env


def test_kill_9_and_resume_gives_the_uninterrupted_result(tmp_path, tiny_llama_dir, text_file):
    from safetensors.torch import load_file

    stages = [{"method": "dense", "steps": 10, "l1": 1e-3, "lr": 1e-3},
              {"method": "srste", "pattern": "2:4", "steps": 100, "update_every": 2, "lr": 1e-3},
              {"method": "fixed", "pattern": "2:4", "steps": 20, "lr": 5e-4}]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, stages, checkpoint_every=4)))
    cmd, env = _train_cmd(recipe, tmp_path / "straight")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)

    cmd, env = _train_cmd(recipe, tmp_path / "killed")
    work = Path(str((tmp_path / "killed").resolve()) + ".work")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # wait for a checkpoint inside stage 2, then kill
        if (work / "checkpoint.pt").exists():
            state = torch.load(work / "checkpoint.pt", weights_only=True)
            if state["stage"] == 1 and state["stage_state"] is not None:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; give it more steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600)
    assert "resumed from stage 2" in out.stdout
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = json.loads((tmp_path / "straight" / "sparsemerge_train.json").read_text())
    rb = json.loads((tmp_path / "killed" / "sparsemerge_train.json").read_text())
    assert ra["perplexity"] == rb["perplexity"]
    assert [s["loss_last"] for s in ra["stages"]] == [s["loss_last"] for s in rb["stages"]]


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path, tiny_llama_dir, text_file, capsys):
    from sparsemerge.cli.main import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama_dir, text_file, THREE_STAGES)))
    work = tmp_path / "work"
    assert main(["train", str(recipe), str(tmp_path / "a"), "--workdir", str(work), "--keep-checkpoint", "--no-progress"]) == 0
    changed = _recipe(tiny_llama_dir, text_file, THREE_STAGES, seed=1)
    recipe.write_text(yaml.safe_dump(changed))
    assert main(["train", str(recipe), str(tmp_path / "b"), "--workdir", str(work), "--no-progress"]) == 2
    assert "another recipe" in capsys.readouterr().err
    assert main(["train", str(recipe), str(tmp_path / "b"), "--workdir", str(work), "--restart", "--no-progress"]) == 0


def test_activation_aware_masks_weight_magnitudes_by_input_norms():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.9, 0.5, 0.4]]))
    net = nn.Sequential(lin)
    weights = trainable_weights(net, pattern=NM24)
    config = StageConfig(method="oneshot", steps=1, lr=1e-9, warmup_steps=0, activation_aware=True)
    x = torch.tensor([[0.1, 0.1, 4.0, 1.0]]).repeat(8, 1)  # features 2, 3 carry the large activations

    def loss_fn(step):
        return net(x).pow(2).mean(), 8

    with pytest.raises(SparsemergeError, match="calibration pass"):
        run_stage(net, list(net.parameters()), weights, config, loss_fn, progress=False, modules={"0": lin})
    report, controller = run_stage(net, list(net.parameters()), weights, config, loss_fn, progress=False,
                                   modules={"0": lin}, calibrate=lambda: net(x))
    # |W| * ||X_j||: 0.1, 0.09, 2.0, 0.4 -> keeps features 2 and 3 where magnitude would keep 0 and 1
    assert controller.masks["0"].tolist() == [[False, False, True, True]]
    assert not lin._forward_hooks  # hooks removed at the end of the stage
    with pytest.raises(SparsemergeError, match="Linear layers only"):
        conv = nn.Conv2d(4, 4, 1)
        MaskController({"c": conv.weight}, Constant(NM24), activation_aware=True, modules={"c": conv})


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_holding_code_is_refused_not_unpickled(tmp_path, capsys):
    from sparsemerge.train.sparse_train import Checkpointer

    ckpt = Checkpointer(tmp_path, 5, "key")
    torch.save({"key": "key", "payload": _Evil()}, ckpt.path)
    with pytest.raises(SparsemergeError, match="cannot be read"):
        ckpt.load()
    assert "this must never run" not in capsys.readouterr().out
