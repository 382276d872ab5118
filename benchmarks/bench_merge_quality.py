"""Real-use merge quality: BBC category specialists merged with every method of the merge engine.

Inputs are the task models of ``benchmarks/make_task_models.py`` (default folder
``/work/main/outputs/task-models/``: ``base/`` and ``bbc-<category>/``; build them first).
For each merge method a mergekit-style config over the base and all specialists is run through
:func:`sparsemerge.merge.run_merge` (streaming, written to disk like a user's merge), the result is
loaded and its held-out perplexity measured on every category. One table lists the base, each
specialist and each merge; rows as they finish, the whole table at the end (plain text on
stdout, markdown in ``--md``, everything in ``--json``).

Protocol: held-out split only (``eval_windows(tokenizer, "bbc:<category>", seqlen, windows)``,
the first ``--windows`` non-overlapping windows of that category's held-out articles; the
specialists were trained on the calibration split only). ``entertainment`` is evaluated but
never trained on: it shows what merging does to a domain no specialist covers. ``mean`` is the
geometric mean of the per-category perplexities (``exp`` of the mean loss).

Recipes (mergekit's semantics and defaults otherwise): soups average the specialists; the
task-vector methods use ``weight = --weight`` (default 0.5) per specialist, ``density = --density``
(default 0.5; breadcrumbs keeps 0.9 and drops the top ``gamma = 0.01``) where the method takes them; ``slerp`` (two models only)
interpolates the first two specialists at ``t = 0.5``; ``passthrough`` stitches the first half of
the layers of the first specialist onto the second half of the second. Stochastic methods use seed 0.
``greedy_soup`` (:func:`sparsemerge.merge.greedy_soup`, in memory) adds specialists best-first while
the validation perplexity does not rise; its validation set is the next ``--val-windows`` held-out
windows of each evaluated category, disjoint from the windows of the table.

Run (after make_task_models.py; about 1 minute per model on one thread of a shared 2-core VM)::

    .venv/bin/python benchmarks/bench_merge_quality.py
    .venv/bin/python benchmarks/bench_merge_quality.py --methods linear ties dare_ties --windows 4
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

DEFAULT_MODELS = Path(os.environ.get("SPARSEMERGE_TASK_MODELS", "/work/main/outputs/task-models"))
METHODS = [  # table order; methods registered later are appended by default_methods()
    "linear", "model_soup", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "orthogonal", "slerp", "passthrough", "greedy_soup",
]


SPARSIFYING = ("ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties")


def recipe(method: str, base: Path, specialists: list[Path], weight: float, density: float, layers: int) -> dict[str, Any]:
    """A mergekit-style config for ``method`` over ``specialists`` (see the module docstring)."""
    models = [str(p) for p in specialists]
    if method in ("linear", "model_soup"):
        entries = [{"model": m, "parameters": {"weight": 1.0}} if method == "linear" else {"model": m} for m in models]
        return {"merge_method": method, "models": entries, "dtype": "float32"}
    if method == "model_stock":
        return {"merge_method": method, "base_model": str(base), "models": [{"model": m} for m in models], "dtype": "float32"}
    if method == "slerp":
        return {"merge_method": method, "base_model": models[0], "models": [{"model": models[0]}, {"model": models[1]}],
                "parameters": {"t": 0.5}, "dtype": "float32"}
    if method == "passthrough":
        half = layers // 2
        return {"merge_method": method, "dtype": "float32", "slices": [
            {"sources": [{"model": models[0], "layer_range": [0, half]}]},
            {"sources": [{"model": models[1], "layer_range": [half, layers]}]},
        ]}
    from sparsemerge.merge import get_method

    spec = get_method(method)  # any other registered method: the task-vector recipe, by its parameters
    params: dict[str, Any] = {}
    if "weight" in spec.model_params:
        params["weight"] = weight
    if method in SPARSIFYING:
        params["density"] = 0.9 if method.startswith("breadcrumbs") else density
    config: dict[str, Any] = {"merge_method": method, "models": [{"model": m, "parameters": dict(params)} for m in models],
                              "dtype": "float32", "seed": 0}
    if spec.base != "none":
        config["base_model"] = str(base)
    return config


def default_methods() -> list[str]:
    """Every method registered in the merge engine, then the greedy soup (Python API)."""
    from sparsemerge.merge import list_methods

    return [*sorted(list_methods(), key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m)), "greedy_soup"]


def evaluate_model(model: Any, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from sparsemerge.eval.perplexity import perplexity

    out = {cat: perplexity(model, w, batch_size=2, progress=False) for cat, w in windows.items()}
    out["mean"] = math.exp(sum(math.log(v) for v in out.values()) / len(out))
    return out


def evaluate(path: Path, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    from sparsemerge.io import load_model

    return evaluate_model(load_model(path).model, windows)


def run_greedy_soup(base: Path, specialists: list[Path], val: torch.Tensor, test: dict[str, torch.Tensor]) -> tuple[dict[str, float], list[int]]:
    """Greedy soup of the specialists scored by perplexity on ``val``; returns its test perplexities and the chosen indices."""
    from safetensors.torch import load_file

    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import load_model
    from sparsemerge.merge import greedy_soup

    model = load_model(base).model
    candidates = [{k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(str(f)).items()} for p in specialists]

    def score(state: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(state, strict=False)
        return perplexity(model, val, batch_size=2, progress=False)

    result = greedy_soup(candidates, score)
    model.load_state_dict(result.state_dict, strict=False)
    return evaluate_model(model, test), result.chosen


def find_specialists(models: Path, categories: "list[str] | None") -> "tuple[Path, list[str], list[Path]] | None":
    """``(base, categories, specialist folders)`` of make_task_models.py's folder, or None after
    saying on stderr what is missing."""
    base = models / "base"
    if not base.is_dir():
        print(f"error: {base} not found; build the task models first: .venv/bin/python benchmarks/make_task_models.py", file=sys.stderr)
        return None
    cats = categories or sorted(p.name[4:] for p in models.glob("bbc-*") if (p / "config.json").is_file())
    specialists = [models / f"bbc-{c}" for c in cats]
    missing = [str(p) for p in specialists if not (p / "config.json").is_file()]
    if len(specialists) < 2 or missing:
        print(f"error: need at least two specialists; missing {missing or cats}", file=sys.stderr)
        return None
    return base, cats, specialists


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="folder of make_task_models.py")
    parser.add_argument("--categories", nargs="+", help="specialists to merge (default: every bbc-* folder)")
    parser.add_argument("--eval-categories", nargs="+", help="default: the specialists' categories + entertainment")
    parser.add_argument("--methods", nargs="+", help="default: every registered merge method, then greedy_soup")
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=6, help="held-out windows per category")
    parser.add_argument("--val-windows", type=int, default=1, help="greedy soup: validation windows per category")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, help="where merges are written (default MODELS/merges; removed after evaluation)")
    parser.add_argument("--keep", action="store_true", help="keep the merged models")
    parser.add_argument("--md", type=Path, default=Path("outputs/merge-quality/merge_quality.md"))
    parser.add_argument("--json", type=Path, default=Path("outputs/merge-quality/merge_quality.json"))
    args = parser.parse_args(argv)

    from sparsemerge.eval.report import format_table
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.io import load_model, write_json_atomic
    from sparsemerge.merge import run_merge

    torch.set_num_threads(args.threads)
    found = find_specialists(args.models, args.categories)
    if found is None:
        return 2
    base, cats, specialists = found
    eval_cats = args.eval_categories or [*cats, "entertainment"]
    tokenizer = load_model(base).tokenizer
    heldout = {c: eval_windows(tokenizer, f"bbc:{c}", args.seqlen, args.windows + args.val_windows) for c in eval_cats}
    windows = {c: w[: args.windows] for c, w in heldout.items()}
    val = torch.cat([w[args.windows :] for w in heldout.values()])
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    work = args.work or args.models / "merges"
    work.mkdir(parents=True, exist_ok=True)
    headers = ["model", *eval_cats, "mean"]
    results: list[dict[str, Any]] = []

    def record(name: str, kind: str, ppl: dict[str, float], seconds: "float | None" = None) -> None:
        results.append({"model": name, "kind": kind, "perplexity": ppl, "merge_seconds": seconds})
        print(f"{name:<44}" + "".join(f"{ppl[c]:>14.2f}" for c in [*eval_cats, "mean"]), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, {"setup": setup, "results": results})

    setup = {"models": str(args.models), "specialists": cats, "eval_categories": eval_cats, "seqlen": args.seqlen,
             "windows": args.windows, "val_windows": args.val_windows, "weight": args.weight, "density": args.density, "threads": args.threads}
    print(f"{len(cats)} specialists ({', '.join(cats)}); held-out perplexity, {args.windows} x {args.seqlen} tokens per category")
    print(f"{'model':<44}" + "".join(f"{h:>14}" for h in headers[1:]), flush=True)
    start = time.perf_counter()
    record("base", "base", evaluate(base, windows))
    for c, path in zip(cats, specialists):
        record(f"specialist {c}", "specialist", evaluate(path, windows))
    for method in args.methods or default_methods():
        if method == "greedy_soup":
            t0 = time.perf_counter()
            ppl, chosen = run_greedy_soup(base, specialists, val, windows)
            record(f"merge greedy_soup ({'+'.join(cats[i] for i in chosen)})", "merge", ppl, time.perf_counter() - t0)
            continue
        out = work / method
        config = recipe(method, base, specialists, args.weight, args.density, layers)
        t0 = time.perf_counter()
        run_merge(config, out, overwrite=True)
        seconds = time.perf_counter() - t0
        label = {"slerp": f"slerp {cats[0]}/{cats[1]}", "passthrough": f"passthrough {cats[0]}|{cats[1]}"}.get(method, method)
        record(f"merge {label}", "merge", evaluate(out, windows), seconds)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    total = time.perf_counter() - start

    rows = [[r["model"], *(r["perplexity"][c] for c in eval_cats), r["perplexity"]["mean"]] for r in results]
    print()
    print(format_table(headers, rows))
    print(f"total {total / 60:.1f} min")
    md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in results:
        ppl = r["perplexity"]
        cells = [r["model"].replace("|", "\\|"), *(f"{ppl[c]:.2f}" for c in eval_cats), f"{ppl['mean']:.2f}"]
        md.append("| " + " | ".join(cells) + " |")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.md.with_name(f".{args.md.name}.tmp")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, args.md)
    print(f"markdown -> {args.md}; json -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
