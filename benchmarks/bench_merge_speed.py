"""Speed, peak memory and equality: sparsemerge vs mergekit on the same configs and inputs.

Inputs: the bundled SmolLM2-135M (float32) as base and three "fine-tuned" copies (base plus
seeded noise on 60 % of the weights, 1 % of each tensor's std), written once under
``outputs/bench_merge/`` -- or, with ``--models DIR``, DIR/base and the first three other
model folders of DIR (e.g. the BBC specialists of ``benchmarks/make_task_models.py``). Each method runs as a fresh process through each tool's CLI
(``sparsemerge merge`` and ``mergekit-yaml``), so the times include start-up (imports) as a
user sees them; peak memory is the child's max RSS (``os.wait4``). Outputs are compared
tensor by tensor (stochastic methods: not compared).

    bash benchmarks/peers/setup_mergekit.sh
    .venv/bin/python benchmarks/bench_merge_speed.py [--methods ties,slerp] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MK = ROOT / ".venv-peers" / "mergekit" / "bin" / "mergekit-yaml"
SM = ROOT / ".venv" / "bin" / "sparsemerge"
WORK = ROOT / "outputs" / "bench_merge"
STOCHASTIC = {"dare_ties", "dare_linear", "della", "della_linear"}


def make_inputs(n: int = 3) -> tuple[Path, list[Path]]:
    from safetensors.torch import load_file, save_file

    from sparsemerge.io.sources import gguf_as_hf_folder, resolve_source

    src = gguf_as_hf_folder(resolve_source("smollm2"))
    base = WORK / "base"
    if not (base / "model.safetensors").is_file():
        base.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "sparsemerge-cache.json":
                shutil.copy2(f, base / f.name)
    tuned = []
    state = None
    for i in range(n):
        d = WORK / f"tuned{i}"
        tuned.append(d)
        if (d / "model.safetensors").is_file():
            continue
        state = state or load_file(str(base / "model.safetensors"))
        g = torch.Generator().manual_seed(100 + i)
        out = {}
        for k, v in state.items():
            noise = torch.randn(v.shape, generator=g) * (0.01 * float(v.float().std()) if v.numel() > 1 else 0.01)
            keep = torch.rand(v.shape, generator=g) < 0.6
            out[k] = (v + noise * keep).to(v.dtype).contiguous()
        d.mkdir(parents=True, exist_ok=True)
        save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, d / f.name)
    return base, tuned


def configs(base: Path, tuned: list[Path]) -> dict[str, dict]:
    b, t = str(base), [str(p) for p in tuned]
    wb = lambda p: [{"model": b}] + [{"model": m, "parameters": p} for m in t]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in t]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "models": wb({"weight": 0.5})},
        "ties": {"merge_method": "ties", "base_model": b, "models": wb({"weight": 1.0, "density": 0.5})},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": t[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": wb(None)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b, "models": wb({"weight": 1.0, "density": 0.8, "gamma": 0.01})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": b, "models": wb({"weight": 1.0, "density": 0.5})},
        "della": {"merge_method": "della", "base_model": b, "models": wb({"weight": 1.0, "density": 0.5, "epsilon": 0.1})},
    }


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall seconds, peak RSS MiB, return code, stderr tail) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, proc.returncode, stderr[-1500:]


def max_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def files(p: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        return float("inf")
    worst = 0.0
    for k in fa:
        with safe_open(str(fa[k]), "pt") as ha, safe_open(str(fb[k]), "pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf")
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads for both tools")
    parser.add_argument("--workers", type=int, help="sparsemerge --threads (tensors merged concurrently; default: its own)")
    parser.add_argument("--models", help="folder with base/ and task models to use instead of perturbed copies")
    parser.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = parser.parse_args()
    if not MK.exists():
        print("mergekit venv missing: bash benchmarks/peers/setup_mergekit.sh", file=sys.stderr)
        return 2
    if args.models:
        folders = sorted(p for p in Path(args.models).iterdir() if (p / "config.json").is_file() and p.name != "base")
        base, tuned = Path(args.models) / "base", folders[:3]
        if len(tuned) < 3 or not (base / "config.json").is_file():
            print(f"--models {args.models}: needs base/ and three model folders", file=sys.stderr)
            return 2
        WORK.mkdir(parents=True, exist_ok=True)
    else:
        base, tuned = make_inputs()
    cfgs = configs(base, tuned)
    wanted = args.methods.split(",") if args.methods else list(cfgs)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    from sparsemerge.eval.report import format_table

    rows = []
    for name in wanted:
        cfg_path = WORK / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfgs[name]))
        outs = {tool: WORK / f"out-{tool}-{name}" for tool in ("sm", "mk")}
        for p in outs.values():
            shutil.rmtree(p, ignore_errors=True)
        sm_cmd = [str(SM), "merge", str(cfg_path), str(outs["sm"]), "--no-progress"]
        if args.workers:
            sm_cmd += ["--threads", str(args.workers)]
        sm = timed(sm_cmd, env)
        mk = timed([str(MK), str(cfg_path), str(outs["mk"]), "--device", "cpu", "--no-write-model-card"], env)
        for tool, res in (("sparsemerge", sm), ("mergekit", mk)):
            if res[2] != 0:
                print(f"{name}: {tool} failed:\n{res[3]}", file=sys.stderr)
        diff = "stochastic" if name in STOCHASTIC else (f"{max_diff(outs['sm'], outs['mk']):.2g}" if sm[2] == mk[2] == 0 else "-")
        rows.append((name, sm[0], mk[0], mk[0] / sm[0], sm[1], mk[1], sm[1] / mk[1], diff))
        print(f"{name}: sparsemerge {sm[0]:.1f} s {sm[1]:.0f} MiB | mergekit {mk[0]:.1f} s {mk[1]:.0f} MiB | max diff {diff}", flush=True)
        if not args.keep:
            for p in outs.values():
                shutil.rmtree(p, ignore_errors=True)
    print()
    workers = f", sparsemerge --threads {args.workers}" if args.workers else ""
    print(f"{'task models of ' + args.models if args.models else 'SmolLM2-135M perturbed copies'}: float32, base + 3 models, OMP threads {args.threads}{workers}, CLI end to end (start-up included)")
    print(format_table(["method", "sparsemerge s", "mergekit s", "speed-up", "sm peak MiB", "mk peak MiB", "memory ratio", "max |diff|"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
