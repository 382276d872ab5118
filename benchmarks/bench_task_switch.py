"""Task switching on one sparse base: switch latency (p50/p99) against reloading a model from
disk, memory for N tasks, and store size against N full models, in one run (issue 15).

    .venv/bin/python benchmarks/bench_task_switch.py                          # SmolLM2 2:4 + BBC specialists
    .venv/bin/python benchmarks/bench_task_switch.py --base-quant int8 --switches 400
    .venv/bin/python benchmarks/bench_task_switch.py --smoke                  # a tiny random model, seconds

The base is SmolLM2 pruned 2:4 by magnitude in memory and packed (``--base-quant`` codec);
the tasks are the BBC specialists of ``benchmarks/make_task_models.py`` (``--tasks`` folders;
without them ``--synthetic N`` random fine-tunes of the base), each added to a task store with
``--select nm`` at ``--density`` and ``--task-quant`` (the specialists' tau measured from the
dense model they were fine-tuned from, ``--finetuned-from``). Then, in one process:

* switch latency: a seeded random walk over the tasks (and pairwise 50/50 combinations with
  ``--combos``): "cold" = a combination not in the LRU cache (computed from the task vectors),
  "warm" = from the cache, "to base" = back to the base (a copy of its snapshot); each measured on the packed model alone and with a DecodeEngine
  whose flat arrays are rebuilt after the switch (what serving needs);
* reload: load the packed task model from disk + build a DecodeEngine (what a device without
  a task store does; a task model packed like the base has the base's size);
* memory: the model, the base snapshot of the tensors tasks change, the task vectors held,
  the cache; sizes: the store's entries against the base and against N packed task models.

Timings are meaningless on a loaded machine: run it alone. Results: a table and ``--json``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

TASK_MODELS = Path(os.environ.get("SPARSEMERGE_TASK_MODELS", "/work/main/outputs/task-models"))


def pct(xs: "list[float]", q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def build_base(work: Path, model_spec: str, smoke: bool, quant: str, group_size: int) -> "tuple[Path, Path]":
    """(HF folder of the 2:4-pruned base, its packed folder)."""
    from sparsemerge.formats.model import pack
    from sparsemerge.io import load_model, save_model
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    if smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import make_tiny_llama, make_tokenizer

        model, tok = make_tiny_llama(hidden=128, intermediate=256), make_tokenizer(384)
    else:
        loaded = load_model(model_spec)
        model, tok = loaded.model, loaded.tokenizer
    prune_(model, PruneConfig(pattern="2:4", progress=False))
    hf = work / "base-hf"
    save_model(model, tok, hf)
    packed = work / "base-packed"
    pack(hf, packed, format="nm", quant=quant, group_size=group_size)
    return hf, packed


def synthetic_tasks(hf: Path, work: Path, n: int, scale: float) -> "list[tuple[str, Path]]":
    """``n`` random 'fine-tunes': every weight + N(0, (scale * its std)^2)."""
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * float(p.float().std()))
        folder = work / f"synthetic-{i}"
        model.save_pretrained(folder)
        out.append((f"task{i}", folder))
    return out


def time_switches(switcher, walk: "list", reps: int) -> "dict[str, list[float]]":
    """Seconds per switch along ``walk`` (repeated ``reps`` times), split by cache hit or miss."""
    out: "dict[str, list[float]]" = {"cold": [], "warm": [], "to base": []}
    for _ in range(reps):
        for spec in walk:
            hits = switcher.cache.hits
            t0 = time.perf_counter()
            switcher.activate(spec)
            dt = time.perf_counter() - t0
            kind = "to base" if spec == "base" else "warm" if switcher.cache.hits > hits else "cold"
            out[kind].append(dt)
    return out


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", nargs="*", default=None, help="fine-tuned model folders (default: the BBC specialists)")
    p.add_argument("--synthetic", type=int, default=4, help="random fine-tunes when no --tasks / specialists exist")
    p.add_argument("--base-quant", choices=["none", "int8", "int4"], default="none")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--finetuned-from", type=Path, default=None,
                   help="the dense model the tasks were fine-tuned from (default for the specialists: their base/)")
    p.add_argument("--task-quant", choices=["int8", "int4", "none"], default="int8")
    p.add_argument("--switches", type=int, default=200, help="switches timed per configuration")
    p.add_argument("--combos", action="store_true", help="also 50/50 pairs of tasks")
    p.add_argument("--cache-mb", type=float, default=2048)
    p.add_argument("--reloads", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny random model and 3 synthetic tasks (checks the script)")
    p.add_argument("--work", type=Path, default=None, help="keep the store here (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    from sparsemerge.deploy.store import TaskStore
    from sparsemerge.deploy.switch import TaskSwitcher
    from sparsemerge.eval.report import format_table
    from sparsemerge.io.atomic import write_json_atomic
    from sparsemerge.kernels.model import load_packed, model_bytes
    from sparsemerge.runtime.engine import DecodeEngine

    torch.set_num_threads(args.threads)  # numba follows torch (kernels/threads.py)
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-task-switch-")
        work = Path(tmp.name)
    else:
        work = args.work
        work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hf, packed = build_base(work, args.model, args.smoke, args.base_quant, args.group_size)
    origin = args.finetuned_from
    if args.tasks:
        tasks = [(Path(t).name, Path(t)) for t in args.tasks]
    elif not args.smoke and sorted(TASK_MODELS.glob("bbc-*")):
        tasks = [(t.name, t) for t in sorted(TASK_MODELS.glob("bbc-*")) if (t / "config.json").is_file()]
        origin = origin or TASK_MODELS / "base"  # the specialists are fine-tunes of the dense model
    else:
        tasks = synthetic_tasks(hf, work, 3 if args.smoke else args.synthetic, 0.05)
    store = TaskStore.init(work / "store", packed, overwrite=True)
    for name, folder in tasks:
        entry = store.add(name, folder, select="nm", density=args.density, quant=args.task_quant, group_size=args.group_size,
                          finetuned_from=origin)
        share = entry.get("on_pattern_energy")
        print(f"  {name}: {entry['nbytes']:,} bytes" + ("" if share is None else f", {100 * share:.1f}% of |tau|^2 on the pattern"))
    print(f"store built in {time.perf_counter() - t0:.0f} s: {len(tasks)} tasks", flush=True)

    names = [n for n, _ in tasks]
    combos = [f"0.5*{a}+0.5*{b}" for i, a in enumerate(names) for b in names[i + 1:]] if args.combos else []
    rng = random.Random(args.seed)
    pool = names + combos + ["base"]
    walk, last = [], None
    while len(walk) < max(1, args.switches // 2):
        spec = rng.choice(pool)
        if spec != last:
            walk.append(spec)
            last = spec

    loaded = load_packed(store.base_dir)
    model = loaded.model
    engine = DecodeEngine(model, loaded.tokenizer, max_seq=64)
    base_bytes = model_bytes(model)
    ids = list(range(1, 9))
    engine.reset()
    base_logits = engine.prefill(ids).copy()
    rows, result = [], {"machine": f"{os.cpu_count()} CPU cores, {args.threads} threads", "tasks": names,
                        "density": args.density, "task_quant": args.task_quant, "base_quant": args.base_quant}
    cache_bytes = int(args.cache_mb * 2**20)
    for label, eng in (("packed values", None), ("+ engine arrays", engine)):
        switcher = TaskSwitcher(store, model, eng, cache_bytes=cache_bytes)
        switcher.activate(names[0])  # numba / first-call costs out of the timing
        switcher.base()
        times = time_switches(switcher, walk, 2)
        for kind in ("cold", "warm", "to base"):
            xs = times[kind]
            rows.append([f"switch, {label}, {kind}", len(xs), 1e3 * pct(xs, 50), 1e3 * pct(xs, 99)])
            result[f"switch_{'engine' if eng else 'values'}_{kind.replace(' ', '_')}_ms"] = {"n": len(xs), "p50": 1e3 * pct(xs, 50), "p99": 1e3 * pct(xs, 99)}
        switcher.base()
        mem = switcher.memory()
    engine.refresh_weights()
    engine.reset()
    assert (engine.prefill(ids) == base_logits).all(), "the base did not come back bit-identically"
    reload = []
    for _ in range(args.reloads):
        r0 = time.perf_counter()
        again = load_packed(store.base_dir)  # a packed task model has the base's layout and size
        DecodeEngine(again.model, again.tokenizer, max_seq=64)
        reload.append(time.perf_counter() - r0)
        del again
    rows.append(["reload from disk + engine", len(reload), 1e3 * pct(reload, 50), 1e3 * pct(reload, 99)])
    result["reload_ms"] = {"n": len(reload), "p50": 1e3 * pct(reload, 50), "p99": 1e3 * pct(reload, 99)}
    warm = result["switch_engine_warm_ms"]["p50"]
    print(format_table(["operation", "n", "p50 ms", "p99 ms"], rows))
    print(f"reload / warm switch with engine (p50): {result['reload_ms']['p50'] / warm:.1f}x")

    listing = store.list_rows()
    entries = sum(r["bytes"] for r in listing)
    sizes = [[r["task"], f"{r['bytes']:,}", f"{100 * r['of_base']:.1f}%"] for r in listing]
    sizes.append([f"store: base + {len(names)} tasks", f"{store.base_nbytes + entries:,}",
                  f"{100 * (store.base_nbytes + entries) / (len(names) * store.base_nbytes):.1f}% of {len(names)} packed models"])
    print(format_table(["entry", "bytes", "of base"], sizes))
    mem_rows = [["model (packed, in memory)", f"{base_bytes:,}"], ["base snapshot of changed tensors", f"{mem['snapshot']:,}"],
                [f"task vectors of {len(names)} tasks", f"{mem['tasks']:,}"], ["cache of combinations", f"{mem['cache']:,}"],
                ["engine refresh indices", f"{mem['engine_refresh']:,}"]]
    print(format_table(["memory", "bytes"], mem_rows))
    result.update({"store_bytes": store.base_nbytes + entries, "base_bytes": store.base_nbytes, "entries": listing,
                   "memory": {"model": base_bytes, **mem}})
    print(result["machine"])
    if args.json:
        write_json_atomic(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
