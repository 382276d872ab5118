"""``sparsemerge tune``: the Pareto frontier and the choice on hand cases, candidates, and
small sweeps of a tiny random Llama (sequential, worker processes, a local Ray cluster)."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_TEXT, make_tiny_llama, make_tokenizer
from sparsemerge.cli.main import main
from sparsemerge.prune.tune import (
    Candidate,
    Constraint,
    build_candidates,
    choose,
    mark_frontier,
    mixed_pack,
    pareto_front,
)

TIMING = {"tok_s", "dense_tok_s", "speedup", "seconds", "frontier"}  # differ between runs


# ----------------------------------------------------------------------------- pure functions
def test_pareto_front_hand_cases():
    # (ppl, MB, tok/s): minimise, minimise, maximise
    a = (10.0, 5.0, 100.0)
    b = (12.0, 4.0, 100.0)  # bigger ppl, smaller: both stay
    c = (11.0, 6.0, 90.0)  # worse than a on all three
    d = (10.0, 5.0, 100.0)  # equal to a: neither dominates the other
    e = (10.0, 5.0, 99.0)  # a is as good on two and better on speed
    f = (9.0, 9.0, 200.0)  # best ppl and speed, largest: stays
    assert pareto_front([a, b, c, d, e, f]) == [True, True, False, True, False, True]
    # failed points (None, NaN) are never on it and dominate nothing
    assert pareto_front([None, (1.0, 1.0, 1.0), (0.5, float("nan"), 9.0)]) == [False, True, False]
    assert pareto_front([(1.0, 1.0, 1.0), (0.5, 0.5, float("inf"))]) == [True, False]
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 2.0, 1.0)]) == [True]
    # one better on each objective: nobody dominated
    assert pareto_front([(1.0, 3.0, 1.0), (3.0, 1.0, 1.0), (2.0, 2.0, 5.0)]) == [True, True, True]


def test_mark_frontier_skips_error_rows():
    rows = [{"ppl": 10.0, "mb": 2.0, "tok_s": 5.0}, {"ppl": 1.0, "mb": 1.0, "tok_s": 9.0, "error": "boom"},
            {"ppl": 11.0, "mb": 3.0, "tok_s": 4.0}]
    assert [r["frontier"] for r in mark_frontier(rows)] == [True, False, False]


def _rows():
    #          ppl   MB   speedup
    data = [(20.0, 10.0, 1.0), (22.0, 6.0, 1.3), (30.0, 3.0, 1.6), (21.0, 6.0, 1.1), (5.0, 1.0, 9.0)]
    rows = [{"index": i, "ppl": p, "mb": m, "speedup": s, "tok_s": 100 * s} for i, (p, m, s) in enumerate(data)]
    rows[4]["error"] = "failed"  # the best numbers, but an error row is never chosen
    return rows


def test_choose_under_each_constraint():
    rows = _rows()
    assert choose(rows, Constraint("max_ppl", 22.0)) == (3, 3)  # 6 MB twice: the lower ppl (21) wins the tie
    assert choose(rows, Constraint("max_ppl", 100.0)) == (2, 2)  # smallest
    assert choose(rows, Constraint("max_mb", 6.0)) == (3, 3)  # lowest ppl among <= 6 MB
    assert choose(rows, Constraint("max_mb", 100.0)) == (0, 0)
    assert choose(rows, Constraint("min_speedup", 1.25)) == (1, 1)
    # nothing meets: the closest by ratio (ppl 20 is 1.33x of 15; 1.6x is 1.25x short of 2.0)
    assert choose(rows, Constraint("max_ppl", 15.0)) == (None, 0)
    assert choose(rows, Constraint("min_speedup", 2.0)) == (None, 2)
    assert choose(rows, Constraint("max_mb", 2.0)) == (None, 2)
    assert choose([{"error": "x"}], Constraint("max_mb", 2.0)) == (None, None)
    with pytest.raises(ValueError, match="positive"):
        Constraint("max_mb", -1)
    with pytest.raises(ValueError, match="constraint must be one of"):
        Constraint("max_size", 1)


def test_sparsity_verdict_says_where_pruning_adds_to_quantization():
    from sparsemerge.prune.tune_report import sparsity_verdict

    def row(label, method, codec, ppl, mb, tok):
        return {"label": label, "method": method, "codec": codec, "ppl": ppl, "mb": mb, "tok_s": tok}

    rows = [row("dense", "none", "none", 10.0, 100.0, 10.0), row("dense int4", "none", "int4", 11.0, 30.0, 20.0),
            row("sparsegpt 2:4 int4", "sparsegpt", "int4", 14.0, 20.0, 25.0),  # smaller and faster: on the frontier
            row("dense int8", "none", "int8", 10.2, 50.0, 15.0),
            row("sparsegpt 2:4 int8", "sparsegpt", "int8", 14.5, 35.0, 14.0)]  # dominated by dense int4
    lines = sparsity_verdict(mark_frontier(rows))
    assert len(lines) == 2
    assert lines[0].startswith("INT4: sparsity adds") and "sparsegpt 2:4 int4" in lines[0] and "beside dense int4" in lines[0]
    assert lines[1].startswith("INT8: sparsity does not add") and "beside dense int8" in lines[1]


def test_build_candidates_families():
    up0, down0, up1, down1 = (f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("up", "down"))
    alloc = (0.5, {up0: "1:4", down0: "dense", up1: "2:4", down1: "2:4"},
             {"method": "magnitude", "pattern": "2:4", "layer_patterns": {f"^{up0}$": "1:4", f"^{down0}$": "dense"}})
    settings = {"calib": "bbc", "nsamples": 4, "seqlen": 64, "seed": 0, "progress": True}
    cands = build_candidates(["magnitude", "wanda"], ["none", "int4"], ["2:4", "1:4"], [alloc], settings, dtype="bfloat16")
    labels = [c.label for c in cands]
    assert labels[:2] == ["dense", "dense int4"]
    assert len(cands) == 2 + 2 * 2 * (2 + 1)
    assert "wanda 1:4 int4" in labels and "magnitude mixed 0.50" in labels
    q = cands[1]
    assert q.recipe is None and q.pack["format"] == "dense" and q.pack["quant"] == "int4" and q.pack["dense_quant"] == "int8"
    u = next(c for c in cands if c.label == "wanda 1:4 int4")
    assert u.recipe == {"calib": "bbc", "nsamples": 4, "seqlen": 64, "seed": 0, "method": "wanda", "pattern": "1:4"}
    assert u.pack["pattern"] == "1:4" and u.pack["dtype"] == "bfloat16" and u.target_sparsity == 0.75
    m = next(c for c in cands if c.label == "wanda mixed 0.50")
    assert m.recipe["method"] == "wanda" and m.target_sparsity == 0.5
    # the pack stores each layer with its own pattern: the most common as the default, the rest by exact regexes
    assert m.pack["pattern"] == "2:4" and m.layer_patterns == alloc[1]
    assert m.pack["layer_patterns"] == {"^model\\.layers\\.0\\.mlp\\.down_proj$": "dense", "^model\\.layers\\.0\\.mlp\\.up_proj$": "1:4"}
    from sparsemerge.formats.model import PackConfig
    from sparsemerge.prune.config import PruneConfig

    PackConfig(**m.pack)
    PruneConfig(**m.recipe)
    with pytest.raises(ValueError, match="unknown codec"):
        build_candidates(["magnitude"], ["int3"], ["2:4"])
    with pytest.raises(ValueError, match="N:M"):
        build_candidates(["magnitude"], ["none"], ["unstructured:0.5"])


def test_mixed_pack_of_all_dense_layers_is_a_dense_pack():
    assert mixed_pack({"a.layers.0.x": "dense"}, {"format": "nm", "pattern": "2:4", "quant": "int4"}) == {
        "format": "dense", "pattern": "2:4", "quant": "int4"}


# ----------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    model = make_tiny_llama(hidden=128, intermediate=256)
    tokenizer = make_tokenizer(384)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    (root / "text.txt").write_text(TINY_TEXT)
    return root


def _args(tiny: Path, *extra: str) -> list[str]:
    return ["tune", str(tiny / "hf"), "--text", str(tiny / "text.txt"), "--methods", "magnitude", "--candidates", "2:4",
            "--no-allocations", "--seqlen", "32", "--max-windows", "2", "--nsamples", "2", "--tokens", "4", "--repeats", "1",
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def sequential(tiny):
    """4 candidates in this process: dense, dense int8, magnitude 2:4, magnitude 2:4 int8."""
    out = tiny / "seq"
    (tiny / "extra.json").write_text(json.dumps([{"label": "llama.cpp Q4_1", "mb": 0.3, "ppl": 380.0, "tok_s": 9000.0}]))
    assert main(_args(tiny, "--codecs", "none,int8", "--max-mb", "1.0", "--out", str(out), "--json", str(tiny / "seq.json"),
                      "--plot", str(tiny / "seq.png"), "--extra-points", str(tiny / "extra.json"))) == 0
    return out, json.loads((tiny / "seq.json").read_text())


def _windows(tiny: Path):
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.io import load_model

    return eval_windows(load_model(tiny / "hf").tokenizer, str(tiny / "text.txt"), 32, 2)


def test_sweep_rows_and_choice(tiny, sequential):
    out, record = sequential
    rows = record["rows"]
    assert [r["label"] for r in rows] == ["dense", "dense int8", "magnitude 2:4", "magnitude 2:4 int8"]
    assert not any(r["error"] for r in rows)
    assert [r["sparsity"] for r in rows] == [0.0, 0.0, 0.5, 0.5]
    dense = rows[0]
    # the dense reference packs every float32 tensor: 4 bytes per parameter
    n_params = sum(p.numel() for p in make_tiny_llama(hidden=128, intermediate=256).parameters())
    assert dense["bytes"] == 4 * n_params
    assert rows[2]["mb"] < dense["mb"] and rows[3]["mb"] < rows[1]["mb"] < rows[2]["mb"]
    assert all(r["ppl_path"] == "runtime" for r in rows)  # 2:4 and INT8 run on the decode runtime
    # --max-mb 1.0: the lowest perplexity at most 1 MB
    fits = [r for r in rows if r["mb"] <= 1.0]
    assert record["chosen"] == min(fits, key=lambda r: (r["ppl"], r["mb"]))["index"]
    assert (tiny / "seq.png").stat().st_size > 1000 and (out / "frontier.png").is_file()
    assert record["extra_points"][0]["label"] == "llama.cpp Q4_1"  # drawn, never chosen
    assert record["verdict"] and all(line.split(":")[0] in ("no quantization", "INT8") for line in record["verdict"])


def test_chosen_model_and_recipe_match_its_row(tiny, sequential):
    from sparsemerge.formats.model import PackConfig
    from sparsemerge.prune.config import PruneConfig
    from sparsemerge.prune.tune_exec import packed_perplexity, torch_threads

    out, record = sequential
    row = record["rows"][record["chosen"]]
    manifest = json.loads((out / "model" / "sparsemerge_packed.json").read_text())
    assert manifest["totals"]["nbytes"] == row["bytes"]
    with torch_threads(1):
        ppl, path = packed_perplexity(out / "model", _windows(tiny))
    assert path == row["ppl_path"] and ppl == pytest.approx(row["ppl"], rel=1e-9)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    candidate = record["candidates"][record["chosen"]]
    assert recipe["pack"] == candidate["pack"] and PackConfig(**recipe["pack"])
    assert candidate["recipe"] is not None and PruneConfig(**recipe["prune"]).method == "magnitude"
    # the recipe reproduces the model with the ordinary commands
    pack = recipe["pack"]
    assert main(["prune", str(tiny / "hf"), str(tiny / "again"), "--recipe", str(out / "recipe.yaml"), "--no-progress"]) == 0
    assert main(["pack", str(tiny / "again"), str(tiny / "again-packed"), "--quant", pack["quant"], "--group", str(pack["group_size"]),
                 "--dense-quant", pack["dense_quant"], "--dtype", pack["dtype"], "--recipe", str(out / "recipe.yaml"), "--no-progress"]) == 0
    again = json.loads((tiny / "again-packed" / "sparsemerge_packed.json").read_text())
    assert again["totals"]["nbytes"] == row["bytes"]
    assert json.loads((out / "tune.json").read_text())["chosen"] == record["chosen"]


@pytest.mark.slow
def test_workers_give_the_sequential_rows(tiny, sequential):
    _, record = sequential
    assert main(_args(tiny, "--codecs", "none,int8", "--max-mb", "1.0", "--workers", "2", "--out", str(tiny / "par"),
                      "--json", str(tiny / "par.json"))) == 0
    par = json.loads((tiny / "par.json").read_text())
    strip = [{k: v for k, v in r.items() if k not in TIMING | {"ppl"}} for r in par["rows"]]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING | {"ppl"}} for r in record["rows"]]
    # perplexity: the same computation; a worker runs one thread where the parent may run two,
    # so float sums may be ordered differently (last digits)
    assert [r["ppl"] for r in par["rows"]] == pytest.approx([r["ppl"] for r in record["rows"]], rel=1e-6)


def test_constraint_not_met_says_the_closest_and_writes_no_model(tiny, capsys):
    out = tiny / "none-meets"
    rc = main(_args(tiny, "--codecs", "none", "--max-ppl", "1.5", "--out", str(out), "--json", str(tiny / "none.json")))
    err = capsys.readouterr().err
    assert rc == 2 and "no candidate meets --max-ppl 1.5" in err and "the closest is #" in err
    assert not out.exists()
    record = json.loads((tiny / "none.json").read_text())
    assert record["chosen"] is None
    best = min(record["rows"], key=lambda r: r["ppl"])
    assert record["closest"] == best["index"] and f"{best['label']!r}" in err


def test_bad_options_are_refused_before_any_work(tiny, capsys):
    (tiny / "exists").mkdir(exist_ok=True)
    assert main(_args(tiny, "--codecs", "none", "--max-ppl", "1e6", "--out", str(tiny / "exists"))) == 2
    assert "already exists" in capsys.readouterr().err
    base = ["tune", str(tiny / "hf"), "--text", str(tiny / "text.txt"), "--max-ppl", "1e6", "--out", str(tiny / "never")]
    for extra, message in ((["--codecs", "int3"], "--codecs takes none, int8, int4"),
                           (["--methods", "magnitude,nope"], "unknown pruning method(s) ['nope']"),
                           (["--candidates", "unstructured:0.5"], "--candidates takes N:M"),
                           (["--sparsities", "0.5,1.2"], "strictly between 0 and 1"),
                           (["--workers", "0"], "--workers must be >= 1"),
                           (["--criterion", "hunch"], "--criterion must be one of taylor, fisher, obs, measured")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
        assert not (tiny / "never").exists()


def test_mixed_allocation_prunes_each_layer_to_its_pattern(tiny, tmp_path):
    """The sensitivity report -> allocate -> recipe path: each layer pruned to its own pattern,
    the measured share of zeros equal to the one its patterns give, the model packed and run."""
    from sparsemerge.io import load_model
    from sparsemerge.masks import check_pattern
    from sparsemerge.patterns import parse_pattern
    from sparsemerge.prune.tune import compute_allocations
    from sparsemerge.prune.tune_exec import build_candidate, evaluate_candidate, packed_perplexity

    loaded = load_model(tiny / "hf")
    settings = {"calib": str(tiny / "text.txt"), "nsamples": 2, "seqlen": 32, "seed": 0}
    allocations = compute_allocations(loaded.model, loaded.tokenizer, ["2:4", "1:4"], [0.6], settings)
    (s, patterns, recipe), = allocations
    assert s == 0.6 and set(patterns.values()) <= {"2:4", "1:4", "dense"} and len(set(patterns.values())) > 1
    cands = build_candidates(["magnitude"], ["none"], ["2:4"], allocations, settings, dtype="float32")
    mixed = next(c for c in cands if c.allocation == "mixed 0.60").to_json()
    info = build_candidate(str(tiny / "hf"), mixed, tmp_path / "packed", tmp_path)
    pruned = load_model(tmp_path / "pruned").model
    original = dict(loaded.model.named_modules())
    zeros = total = 0
    for name, pattern in patterns.items():
        w = pruned.get_submodule(name).weight.detach()
        if pattern == "dense":
            assert torch.equal(w, original[name].weight.detach())
        else:
            assert check_pattern(w, parse_pattern(pattern)).ok
            zeros += w.numel() * (1 - parse_pattern(pattern).density)
        total += w.numel()
    assert info["sparsity"] == pytest.approx(zeros / total) and info["sparsity"] >= 0.6 - 1e-9
    row = evaluate_candidate(str(tiny / "hf"), mixed, {"windows": _windows(tiny).tolist(), "tokens": 2, "repeats": 1}, 5)
    assert row["error"] is None and row["index"] == 5 and row["sparsity"] == pytest.approx(info["sparsity"])
    assert row["ppl"] == pytest.approx(packed_perplexity(tmp_path / "packed", _windows(tiny))[0], rel=1e-6)


def test_mixed_candidate_is_pruned_and_packed_layer_by_layer(tiny, tmp_path):
    """A hand allocation (2:4, 1:4, 4:8 and dense layers) under INT8: each layer pruned to its
    own pattern, stored with it (the dense layer dense, in the targeted codec), run on the runtime."""
    from sparsemerge.formats.model import read_packed
    from sparsemerge.io import load_model
    from sparsemerge.masks import check_pattern
    from sparsemerge.patterns import parse_pattern
    from sparsemerge.prune.tune_exec import build_candidate, evaluate_candidate

    names = [f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    patterns = {n: "2:4" for n in names} | {names[5]: "1:4", names[6]: "dense", names[13]: "4:8"}
    recipe = {"method": "magnitude", "pattern": "2:4", "layer_patterns": {f"^{n}$": p for n, p in patterns.items() if p != "2:4"}}
    cand = next(c for c in build_candidates(["magnitude"], ["int8"], ["2:4"], [(0.5, patterns, recipe)], dtype="float32")
                if c.allocation == "mixed 0.50").to_json()
    info = build_candidate(str(tiny / "hf"), cand, tmp_path / "packed", tmp_path)
    pruned, original = load_model(tmp_path / "pruned").model, load_model(tiny / "hf").model
    zeros = total = 0
    for name, pattern in patterns.items():
        w = pruned.get_submodule(name).weight.detach()
        total += w.numel()
        if pattern == "dense":
            assert torch.equal(w, original.get_submodule(name).weight.detach())
            continue
        sparsity = 1 - parse_pattern(pattern).density
        assert check_pattern(w, parse_pattern(pattern)).ok and float((w == 0).float().mean()) == sparsity
        zeros += w.numel() * sparsity
    assert info["sparsity"] == pytest.approx(zeros / total)
    with read_packed(tmp_path / "packed") as ckpt:
        stored = {n: ckpt.get_format(n + ".weight") for n in names}
    for name, pattern in patterns.items():
        obj = stored[name]
        if pattern == "dense":
            assert obj.name == "dense" and obj.values.kind == "int8"  # the targeted codec
        else:
            assert obj.name == "nm" and f"{obj.n}:{obj.m}" == pattern
    row = evaluate_candidate(str(tiny / "hf"), cand, {"windows": _windows(tiny).tolist(), "tokens": 2, "repeats": 1})
    assert row["error"] is None and row["ppl_path"] == "runtime" and row["speed_path"] == "runtime"


def test_a_failing_candidate_becomes_an_error_row(tiny):
    from sparsemerge.prune.tune_exec import run_candidates

    bad = Candidate("bad", "magnitude", "uniform 2:4", "none", {"method": "no-such-method", "pattern": "2:4"},
                    {"format": "nm", "pattern": "2:4"}).to_json()
    good = Candidate("dense", "none", "dense", "none", None, {"format": "dense"}).to_json()
    rows = run_candidates(str(tiny / "hf"), [bad, good], {"windows": _windows(tiny).tolist(), "tokens": 2, "repeats": 1},
                          progress=False)
    assert "no-such-method" in rows[0]["error"] and rows[0]["ppl"] is None
    assert rows[1]["error"] is None and math.isfinite(rows[1]["ppl"])


def test_extra_points_are_validated(tmp_path):
    from sparsemerge.prune.tune_report import load_extra_points

    good = tmp_path / "p.json"
    good.write_text(json.dumps([{"label": "llama.cpp Q4_1", "mb": 85.9, "ppl": 21.5, "tok_s": 60}]))
    assert load_extra_points(good) == [{"label": "llama.cpp Q4_1", "mb": 85.9, "ppl": 21.5, "tok_s": 60.0}]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"points": [{"label": "x", "mb": "big"}]}))
    with pytest.raises(ValueError, match="needs numbers 'mb' and 'ppl'"):
        load_extra_points(bad)


# ----------------------------------------------------------------------------- Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_cluster_sweep(tiny, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'sparsemerge[ray]')")
    port = _free_port()
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ)
    # the cluster's workers import this checkout's sparsemerge and the same ray
    env["PYTHONPATH"] = os.pathsep.join([src, str(Path(ray.__file__).parents[1]), env.get("PYTHONPATH", "")])
    temp = Path("/tmp") / f"ray-tune-{os.getpid()}"
    head = subprocess.Popen(
        [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())", "start", "--head", "--block",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 40
        while True:  # the GCS port answers once the head is up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the local Ray head did not start")
                time.sleep(0.5)
        rc = main(_args(tiny, "--codecs", "none", "--max-ppl", "1e6", "--ray", f"127.0.0.1:{port}", "--out", str(tmp_path / "out"),
                        "--json", str(tmp_path / "ray.json")))
        assert rc == 0
        rows = json.loads((tmp_path / "ray.json").read_text())["rows"]
        assert [r["label"] for r in rows] == ["dense", "magnitude 2:4"] and not any(r["error"] for r in rows)
        # the same numbers as in this process
        from sparsemerge.prune.tune_exec import evaluate_candidate

        cand = json.loads((tmp_path / "ray.json").read_text())["candidates"][1]
        local = evaluate_candidate(str(tiny / "hf"), cand, {"windows": _windows(tiny).tolist(), "tokens": 2, "repeats": 1}, 1)
        assert local["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-6) and local["bytes"] == rows[1]["bytes"]
        assert (tmp_path / "out" / "model" / "sparsemerge_packed.json").is_file()
    finally:
        import signal

        try:  # the head and everything it started share its session: end exactly those
            os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
