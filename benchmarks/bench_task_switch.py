"""Task switching on one sparse base: switch latency (p50/p99) against reloading a model from
disk, memory for N tasks, and store size against N full models, in one run (issue 15).

    .venv/bin/python benchmarks/bench_task_switch.py                          # SmolLM2 2:4 + BBC specialists
    .venv/bin/python benchmarks/bench_task_switch.py --base-quant int8 --switches 400
    .venv/bin/python benchmarks/bench_task_switch.py --smoke                  # a tiny random model, seconds
    .venv/bin/python benchmarks/bench_task_switch.py --ppl-windows 0 --load-requests 0   # switching only

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
  the cache; sizes: the store's entries against the base and against N packed task models;
* quality (``--ppl-windows``, BBC specialists only): per-category held-out perplexity of the
  dense base, the dense specialist, the specialist pruned 2:4 on its own (what N separately
  packed task models would give), the 2:4 base and the served task (base + its stored tau, on
  the decode runtime, as the server runs it);
* serving (``--load-requests``): ``sparsemerge serve STORE`` in its own process on 127.0.0.1 (an
  ephemeral port): first every task's greedy completion over HTTP against the same task
  activated and run alone in this process, then a bounded mixed-task load (``--clients``
  concurrent clients, tasks drawn at random, temperature 0.7): requests/s, generated tokens/s,
  request latency p50/p99; then Ctrl-C (SIGINT) and the server's exit code.

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

# No OMP_WAIT_POLICY=PASSIVE here (make_task_models.py sets it for training on a shared machine):
# a decode step launches hundreds of parallel regions, and passive workers double its time.

import torch  # noqa: E402

TASK_MODELS = Path(os.environ.get("SPARSEMERGE_TASK_MODELS", "/work/main/outputs/task-models"))


def pct(xs: "list[float]", q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def build_base(work: Path, model_spec: str, smoke: bool, quant: str, group_size: int,
               method: str = "magnitude") -> "tuple[Path, Path]":
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
    prune_(model, prune_config("magnitude" if smoke else method), tok)
    hf = work / "base-hf"
    save_model(model, tok, hf)
    packed = work / "base-packed"
    pack(hf, packed, format="nm", quant=quant, group_size=group_size)
    return hf, packed


def prune_config(method: str):
    from sparsemerge.prune.config import PruneConfig

    # SparseGPT as the demo calibrates it (8 x 512 BBC tokens): magnitude 2:4 leaves SmolLM2 at
    # perplexity ~2,300, too far from any task for per-category numbers to mean anything
    return PruneConfig(pattern="2:4", method=method, nsamples=8, seqlen=512, progress=False)


def category_perplexities(tasks, switcher, engine, tokenizer, origin: Path, method: str,
                          windows_per_task: int, seqlen: int) -> "list[dict]":
    """Held-out perplexity per BBC category: dense base and specialist, the specialist pruned
    on its own, the 2:4 base and the served task (both on the decode runtime)."""
    from transformers import AutoModelForCausalLM

    from sparsemerge.eval.data import eval_windows
    from sparsemerge.eval.perplexity import engine_perplexity, perplexity
    from sparsemerge.prune.api import prune_

    def dense(folder: Path, windows, prune: bool = False) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        if prune:
            prune_(model, prune_config(method), tokenizer)
        return perplexity(model, windows, progress=False)

    out = []
    for name, folder in tasks:
        category = name.removeprefix("bbc-")
        windows = eval_windows(tokenizer, f"bbc:{category}", seqlen, windows_per_task)
        row = {"task": name, "windows": int(windows.shape[0]), "seqlen": seqlen,
               "dense base": dense(origin, windows), "dense specialist": dense(folder, windows),
               f"specialist pruned 2:4 alone": dense(folder, windows, prune=True)}
        switcher.base()
        row["2:4 base (served)"] = engine_perplexity(engine, windows, progress=False)
        switcher.activate(name)
        row["served task"] = engine_perplexity(engine, windows, progress=False)
        switcher.base()
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        out.append(row)
    return out


def _post(url: str, body: dict, timeout: float = 600.0) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def serve_under_load(store_dir: Path, names: "list[str]", requests: int, clients: int, max_tokens: int,
                     threads: int, seed: int) -> dict:
    """``sparsemerge serve`` as a user starts it (its own process, ephemeral localhost port):
    served == run alone for every task, then a bounded mixed-task load of ``requests``
    completions from ``clients`` concurrent clients."""
    import socket
    import subprocess
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from sparsemerge.deploy.store import TaskStore
    from sparsemerge.deploy.switch import TaskSwitcher
    from sparsemerge.kernels.model import load_for_run
    from sparsemerge.runtime.engine import DecodeEngine
    from sparsemerge.runtime.sampling import SamplingConfig

    prompts = ["The government said", "Shares in the company", "The team won the match",
               "A new phone", "The film", "Interest rates"]
    models = ["base"] + names
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                                        *filter(None, [os.environ.get("PYTHONPATH")])]))
    server = subprocess.Popen([sys.executable, "-m", "sparsemerge.cli.main", "serve", str(store_dir), "--port", str(port),
                               "--max-seq", "256"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):  # up to 60 s to load and listen
            if server.poll() is not None:
                raise SystemExit(f"sparsemerge serve exited with {server.returncode}:\n{server.stderr.read()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/models", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        # what each task model gives alone (loaded as the server loads it), greedy
        store = TaskStore(store_dir)
        loaded = load_for_run(str(store.base_dir))
        engine = DecodeEngine(loaded.model, loaded.tokenizer, max_seq=256)
        switcher = TaskSwitcher(store, loaded.model, engine)
        mismatches = []
        for model in models:
            served = _post(url + "/completions", {"model": model, "prompt": prompts[0], "max_tokens": max_tokens, "temperature": 0})
            switcher.activate(model)
            alone = engine.generate(prompts[0], max_tokens, SamplingConfig(temperature=0.0)).text
            if served["choices"][0]["text"] != alone:
                mismatches.append(model)
        del engine, switcher, loaded
        rng = random.Random(seed)
        load = [(rng.choice(models), rng.choice(prompts)) for _ in range(requests)]
        latencies: "list[float]" = []
        generated: "list[int]" = []

        def one(job):
            model, prompt = job
            r0 = time.perf_counter()
            body = _post(url + "/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                "temperature": 0.7, "seed": 1})
            latencies.append(time.perf_counter() - r0)
            generated.append(int(body["usage"]["completion_tokens"]))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, load))
        wall = time.perf_counter() - t0
        loaded_stats = {"wall_s": wall, "requests_per_s": requests / wall, "tokens_per_s": sum(generated) / wall,
                        "completion_tokens": sum(generated), "latency_p50_ms": 1e3 * pct(latencies, 50),
                        "latency_p99_ms": 1e3 * pct(latencies, 99)}
        # the same kind of requests one at a time, one task: the single-stream rate for comparison
        n_seq = max(1, requests // 4)
        latencies, generated = [], []
        s0 = time.perf_counter()
        for _ in range(n_seq):
            one((names[0] if names else "base", prompts[0]))
        sequential = {"requests": n_seq, "tokens_per_s": sum(generated) / (time.perf_counter() - s0),
                      "latency_p50_ms": 1e3 * pct(latencies, 50)}
    finally:
        server.send_signal(2)  # Ctrl-C: the server shuts down cleanly
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "threads": threads, **loaded_stats,
            "one_client_one_task": sequential, "served_equal_alone": not mismatches,
            "mismatched": mismatches, "checked": models, "server_exit": server.returncode}


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
    p.add_argument("--method", default="sparsegpt", help="how the base is pruned to 2:4 (smoke: magnitude)")
    p.add_argument("--ppl-windows", type=int, default=6, help="held-out windows per BBC category (0: no quality table)")
    p.add_argument("--ppl-seqlen", type=int, default=256)
    p.add_argument("--load-requests", type=int, default=48, help="completions in the mixed-task load (0: no server run)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients of the load")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every load request")
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
    hf, packed = build_base(work, args.model, args.smoke, args.base_quant, args.group_size, args.method)
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

    specialists = [(n, f) for n, f in tasks if n.startswith("bbc-")]
    if args.ppl_windows > 0 and specialists and origin is not None:
        print(f"per-category perplexity ({args.ppl_windows} x {args.ppl_seqlen} held-out tokens per category) ...", flush=True)
        engine = DecodeEngine(model, loaded.tokenizer, max_seq=args.ppl_seqlen)
        switcher = TaskSwitcher(store, model, engine, cache_bytes=cache_bytes)
        quality = category_perplexities(specialists, switcher, engine, loaded.tokenizer, origin, args.method,
                                        args.ppl_windows, args.ppl_seqlen)
        cols = [k for k in quality[0] if k not in ("task", "windows", "seqlen")]
        qrows = [[q["task"]] + [q[c] for c in cols] for q in quality]
        qrows.append(["mean"] + [statistics.fmean(q[c] for q in quality) for c in cols])
        print(format_table(["task"] + cols, qrows))
        result["perplexity"] = quality
    if args.load_requests > 0:
        print(f"serving: {args.load_requests} completions from {args.clients} clients, max_tokens {args.max_tokens} ...", flush=True)
        served = serve_under_load(store.path, names, args.load_requests, args.clients, args.max_tokens, args.threads, args.seed)
        print(format_table(["serving", "value"], [[k, v] for k, v in served.items()]))
        result["serving"] = served
    print(result["machine"])
    if args.json:
        write_json_atomic(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
