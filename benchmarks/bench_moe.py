"""A mixture of the BBC specialists (``sparsemerge moe``) vs each specialist and the TIES merge;
build time and peak memory vs ``mergekit-moe`` on the same YAML.

Inputs are the task models of ``benchmarks/make_task_models.py`` (default folder
``/work/main/outputs/task-models/``: ``base/`` and ``bbc-<category>/``; build them first). The
MoE config (mergekit-moe's YAML, written to ``WORK/moe.yaml``) has one expert per specialist
whose positive prompts are the first ``--prompts`` *calibration* articles of its category, each
cut to ``--prompt-chars`` characters (the specialists were trained on that split; held-out
articles are never prompts), ``gate_mode`` ``--gate-mode`` (default ``hidden``, mergekit's
default), ``experts_per_token`` ``--experts-per-token`` (default 2), float32.

1. Speed: ``sparsemerge moe`` and ``mergekit-moe --device cpu`` each run ``--repeats`` times as
   fresh processes on that YAML (start-up included, as a user sees it); wall time is the best
   run, peak memory the child's max RSS (``os.wait4``), both with ``--threads`` OMP threads.
   The two outputs are compared tensor by tensor (deterministic gate modes: equal).
   Target (issue 16): at most half mergekit-moe's time, no more memory.
2. Quality: held-out perplexity per category (``eval_windows(tokenizer, "bbc:<category>",
   --seqlen, --windows)``, the protocol of bench_merge_quality.py) of the base, each
   specialist, the TIES merge of the specialists (bench_merge_quality's recipe: weight
   ``--weight``, density ``--density``) and the MoE. ``mean`` is the geometric mean.
   With ``--keep-pattern 2:4`` one more row: the same MoE with every expert projected onto the
   N:M pattern (``keep_pattern``) and run on the project's N:M kernels (``sparse_experts_``).
3. Routing: for the first held-out article of each category (its first ``--prompt-chars``
   characters), the share of router selections that go to each expert.

Run (after make_task_models.py and benchmarks/peers/setup_mergekit.sh)::

    .venv/bin/python benchmarks/bench_moe.py
    .venv/bin/python benchmarks/bench_moe.py --gate-mode cheap_embed --repeats 3 --skip-quality
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see make_task_models.py

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MK_MOE = ROOT / ".venv-peers" / "mergekit" / "bin" / "mergekit-moe"
DEFAULT_MODELS = Path(os.environ.get("SPARSEMERGE_TASK_MODELS", "/work/main/outputs/task-models"))
DETERMINISTIC = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")


def cut(text: str, chars: int) -> str:
    """The first ``chars`` characters, ending at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= chars:
        return text
    return text[:chars].rsplit(" ", 1)[0]


def moe_config(base: Path, specialists: list[Path], cats: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from sparsemerge.eval.data import load_texts

    experts = []
    for cat, path in zip(cats, specialists):
        prompts = [cut(t, args.prompt_chars) for t in load_texts(f"bbc:{cat}", "calib")[: args.prompts]]
        experts.append({"source_model": str(path), "positive_prompts": prompts})
    return {"base_model": str(base), "gate_mode": args.gate_mode, "dtype": "float32",
            "experts_per_token": args.experts_per_token, "experts": experts}


def max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    def load(p: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    x, y = load(a), load(b)
    if set(x) != set(y):
        return float("inf")
    worst = 0.0
    for k in x:
        if x[k].shape != y[k].shape or x[k].dtype != y[k].dtype:
            return float("inf")
        worst = max(worst, (x[k].double() - y[k].double()).abs().max().item())
    return worst


def run_speed(cfg_path: Path, work: Path, args: argparse.Namespace) -> tuple[list[dict[str, Any]], Path]:
    """Both tools on ``cfg_path``; returns the rows and sparsemerge's output folder (kept for evaluation)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_merge_speed import timed  # wall time and peak RSS of a child process

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    tools = {"sparsemerge": lambda out: [sys.executable, "-m", "sparsemerge.cli.main", "moe", str(cfg_path), str(out), "--no-progress"]}
    if MK_MOE.exists():
        tools["mergekit-moe"] = lambda out: [str(MK_MOE), str(cfg_path), str(out), "--device", "cpu", "--no-write-model-card"]
    else:
        print(f"mergekit peer venv absent ({MK_MOE}); timing sparsemerge only (bash benchmarks/peers/setup_mergekit.sh)", file=sys.stderr)
    rows, outs = [], {}
    for tool, command in tools.items():
        out = outs[tool] = work / f"moe-{tool}"
        best, peak = math.inf, 0.0
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            seconds, mib, rc, err = timed(command(out), env)
            if rc != 0:
                raise SystemExit(f"{tool} failed (exit {rc}):\n{err}")
            best, peak = min(best, seconds), max(peak, mib)
        rows.append({"tool": tool, "seconds": best, "peak_mib": peak})
        print(f"{tool:<14} {best:8.2f} s {peak:8.0f} MiB", flush=True)
    if "mergekit-moe" in outs:
        diff = max_diff(outs["sparsemerge"], outs["mergekit-moe"])
        mk = rows[1]
        rows[0].update(time_ratio=rows[0]["seconds"] / mk["seconds"], memory_ratio=rows[0]["peak_mib"] / mk["peak_mib"], max_diff=diff)
        print(f"sparsemerge / mergekit-moe: time {rows[0]['time_ratio']:.2f}x, peak memory {rows[0]['memory_ratio']:.2f}x, "
              f"max |diff| {diff:.3g}" + ("" if args.gate_mode in DETERMINISTIC else " (random gates: not comparable)"), flush=True)
        if not args.keep:
            shutil.rmtree(outs["mergekit-moe"], ignore_errors=True)
    return rows, outs["sparsemerge"]


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of make_task_models.py")
    parser.add_argument("--categories", nargs="+", help="specialists to combine (default: every bbc-* folder)")
    parser.add_argument("--eval-categories", nargs="+", help="default: the specialists' categories + entertainment")
    parser.add_argument("--gate-mode", default="hidden", help="gate_mode of the MoE config (default hidden)")
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8, help="calibration articles per expert as positive prompts")
    parser.add_argument("--prompt-chars", type=int, default=300, help="characters kept of each prompt article")
    parser.add_argument("--weight", type=float, default=0.5, help="TIES weight per specialist")
    parser.add_argument("--density", type=float, default=0.5, help="TIES density")
    parser.add_argument("--keep-pattern", metavar="N:M", help="also an MoE whose experts are N:M, run on the N:M kernels")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=6, help="held-out windows per category")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool for the timing (best time, max memory)")
    parser.add_argument("--skip-speed", action="store_true", help="build the MoE in-process; no mergekit-moe comparison")
    parser.add_argument("--skip-quality", action="store_true", help="timing only")
    parser.add_argument("--work", type=Path, help="where the YAML and outputs go (default MODELS/moe-bench)")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    parser.add_argument("--md", type=Path, default=Path("outputs/moe/bench_moe.md"))
    parser.add_argument("--json", type=Path, default=Path("outputs/moe/bench_moe.json"))
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_merge_quality import evaluate, evaluate_model, find_specialists, recipe  # the same protocol and TIES recipe

    from sparsemerge.eval.data import eval_windows, load_texts
    from sparsemerge.eval.report import format_table
    from sparsemerge.io import load_model, write_json_atomic
    from sparsemerge.merge import run_merge
    from sparsemerge.merge.moe import build_moe, format_routing, load_moe_config, route_texts, sparse_experts_

    torch.set_num_threads(args.threads)
    found = find_specialists(args.models, args.categories)
    if found is None:
        return 2
    base, cats, specialists = found
    work = args.work or args.models / "moe-bench"
    work.mkdir(parents=True, exist_ok=True)
    cfg = moe_config(base, specialists, cats, args)
    cfg_path = work / "moe.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    setup = {"models": str(args.models), "specialists": cats, "gate_mode": args.gate_mode, "experts_per_token": args.experts_per_token,
             "keep_pattern": args.keep_pattern,
             "prompts": args.prompts, "prompt_chars": args.prompt_chars, "seqlen": args.seqlen, "windows": args.windows,
             "threads": args.threads, "repeats": args.repeats, "ties": {"weight": args.weight, "density": args.density}}
    result: dict[str, Any] = {"setup": setup, "speed": [], "quality": [], "routing": None}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, result)

    start = time.perf_counter()
    moe_dir = work / "moe-sparsemerge"
    if args.skip_speed:
        shutil.rmtree(moe_dir, ignore_errors=True)
        build_moe(cfg_path, moe_dir)
    else:
        print(f"MoE build of {len(cats)} experts ({', '.join(cats)}), gate_mode {args.gate_mode}, {args.threads} thread(s), best of {args.repeats}")
        result["speed"], moe_dir = run_speed(cfg_path, work, args)
        save()

    md: list[str] = []
    if result["speed"]:
        headers = ["tool", "wall s", "peak MiB"]
        rows = [[r["tool"], r["seconds"], r["peak_mib"]] for r in result["speed"]]
        print("\n" + format_table(headers, rows))
        md += ["| " + " | ".join(headers) + " |", "|---|---|---|", *(f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} |" for r in rows), ""]
        first = result["speed"][0]
        if "time_ratio" in first:
            md.append(f"sparsemerge / mergekit-moe: time {first['time_ratio']:.2f}x, peak memory {first['memory_ratio']:.2f}x, "
                      f"max abs diff {first['max_diff']:.3g}\n")

    if not args.skip_quality:
        eval_cats = args.eval_categories or [*cats, "entertainment"]
        tokenizer = load_model(base).tokenizer
        windows = {c: eval_windows(tokenizer, f"bbc:{c}", args.seqlen, args.windows) for c in eval_cats}
        headers = ["model", *eval_cats, "mean"]
        print(f"\nheld-out perplexity, {args.windows} x {args.seqlen} tokens per category")
        print(f"{'model':<32}" + "".join(f"{h:>14}" for h in headers[1:]), flush=True)

        def record(name: str, ppl: dict[str, float]) -> None:
            result["quality"].append({"model": name, "perplexity": ppl})
            print(f"{name:<32}" + "".join(f"{ppl[c]:>14.2f}" for c in [*eval_cats, "mean"]), flush=True)
            save()

        record("base", evaluate(base, windows))
        for c, path in zip(cats, specialists):
            record(f"specialist {c}", evaluate(path, windows))
        ties_dir = work / "ties"
        layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
        run_merge(recipe("ties", base, specialists, args.weight, args.density, layers), ties_dir, overwrite=True)
        record("merge ties", evaluate(ties_dir, windows))
        moe = load_model(moe_dir)
        record(f"moe {args.gate_mode} top-{args.experts_per_token}", evaluate_model(moe.model, windows))
        if args.keep_pattern:
            nm_dir = work / "moe-nm"
            build_moe(load_moe_config({**cfg, "keep_pattern": args.keep_pattern}), nm_dir, overwrite=True)
            nm = load_model(nm_dir).model
            sparse_experts_(nm, args.keep_pattern)
            record(f"moe {args.keep_pattern} experts (kernels)", evaluate_model(nm, windows))
            del nm
            if not args.keep:
                shutil.rmtree(nm_dir, ignore_errors=True)
        rows = [[r["model"], *(r["perplexity"][c] for c in eval_cats), r["perplexity"]["mean"]] for r in result["quality"]]
        print("\n" + format_table(headers, rows))
        md += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        md += ["| " + " | ".join([r[0], *(f"{v:.2f}" for v in r[1:])]) + " |" for r in rows]
        md.append("")

        texts = [cut(load_texts(f"bbc:{c}", "heldout")[0], args.prompt_chars) for c in eval_cats]
        routing = route_texts(moe.model, texts, moe.tokenizer, expert_names=cats)
        table = format_routing(routing)
        print("\nrouting of the first held-out article of each category (" + ", ".join(eval_cats) + "):\n" + table)
        result["routing"] = {"categories": eval_cats, **routing.to_json()}
        md += ["routing (first held-out article per category, in order " + ", ".join(eval_cats) + "):", "", "```", table, "```"]
        save()
        if not args.keep:
            shutil.rmtree(ties_dir, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(moe_dir, ignore_errors=True)
    print(f"total {(time.perf_counter() - start) / 60:.1f} min")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.md.with_name(f".{args.md.name}.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, args.md)
    save()
    print(f"markdown -> {args.md}; json -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
