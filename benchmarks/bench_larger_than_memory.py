"""Larger than memory: merge, prune and pack a checkpoint four times the memory they may use.

Generates (deterministically, shard by shard, never the whole model in memory) a sharded
Llama-shaped Hugging Face checkpoint - by default TinyLlama-1.1B's shape (hidden 2048, MLP 5632,
22 layers, 32 heads / 4 KV heads, vocabulary 32000, untied head) in float32, 4.4 GB in ~1 GB
shards - and two "fine-tuned" variants (base + seeded deltas of 0.002 std), then runs each
command as a child process under a hard memory limit of ``--fraction`` (default a quarter) of
one model's size:

* ``merge-linear``: ``sparsemerge merge`` of the three models, linear, weights 0.5 / 0.3 / 0.2;
* ``merge-ties``: ``sparsemerge merge``, TIES of the two variants on the base, density 0.5;
* ``prune``: ``sparsemerge prune BASE --pattern 2:4 --method magnitude``;
* ``pack``: ``sparsemerge pack PRUNED`` (nm 2:4, entropy-coded positions, unquantized values).

The limit: ``RLIMIT_AS`` when the interpreter and the command's imports use at most half of it
(probed), else ``RLIMIT_DATA`` (private writable memory: heap, anonymous mappings, thread
stacks - what the process allocates, without the address space that torch's and numba's
libraries reserve and never touch); the table says which. A cgroup would bound resident memory
itself, but this machine's memory cgroup (v1) belongs to the job runner and is left alone.
Peak memory: the command's maximum resident set (``os.wait4`` in a small launcher). Each output is checked: every
tensor of the base present with its shape, and a few named tensors against a reference
computed here from the inputs, read with ``safetensors.safe_open`` (merge: the formula; prune:
the top-2 of every 4 magnitudes; pack: the packed tensor decodes to the pruned one).

    .venv/bin/python benchmarks/bench_larger_than_memory.py [--workdir DIR] [--keep] [--steps prune,pack]
        [--layers 22 --hidden 2048 --intermediate 5632 --vocab 32000 --dtype float32] [--fraction 0.25]

Disk: three models plus the largest output (~5.5x one model: 24 GB at the default shape);
each output is deleted once checked, everything at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
SM = ROOT / ".venv" / "bin" / "sparsemerge"
DEFAULT_WORKDIR = Path(os.environ.get("BENCH_TMP", "/work/bench-tmp")) / "larger-than-memory"
STEPS = ("merge-linear", "merge-ties", "prune", "pack")
LINEAR_WEIGHTS = (0.5, 0.3, 0.2)
TIES_DENSITY = 0.5
DELTA_STD = 0.002
# what the commands import (the probe measures the interpreter + these, as the children pay it)
PROBE = (
    "import torch, transformers, sparsemerge.merge.engine, sparsemerge.formats.model, sparsemerge.prune.api, "
    "sparsemerge.prune.streaming; torch.randn(1 << 20).sum(); "
    "import json; s = open('/proc/self/status').read(); "
    "print(json.dumps({k: int(s.split(k + ':')[1].split()[0]) for k in ('VmPeak', 'VmHWM', 'VmData')}))"
)


# ----------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Shape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 22
    heads: int = 32
    kv_heads: int = 4
    vocab: int = 32000
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """``(name, shape)`` of every LlamaForCausalLM tensor, in the model's order."""
        h, i, kv = self.hidden, self.intermediate, self.hidden // self.heads * self.kv_heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.torch_dtype).element_size()
        return sum(_numel(s) for _, s in self.tensors()) * size

    def largest(self) -> int:
        size = torch.empty((), dtype=self.torch_dtype).element_size()
        return max(_numel(s) for _, s in self.tensors()) * size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_tensor(name: str, shape: tuple[int, ...], variant: int, dtype: torch.dtype) -> torch.Tensor:
    """Deterministic per (name, variant): base ``0.02 N(0,1)`` (norms ``1 + 0.01 N(0,1)``);
    variant ``v > 0`` adds ``0.002 N(0,1)`` from its own seed. Computed in float32."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g)
    if len(shape) == 1:
        t.mul_(0.01).add_(1.0)
    else:
        t.mul_(0.02)
    if variant:
        g.manual_seed(zlib.crc32(name.encode()) + 7919 * variant)
        t.add_(torch.randn(shape, generator=g), alpha=DELTA_STD)
    return t.to(dtype)


def write_checkpoint(folder: Path, shape: Shape, variant: int, shard_bytes: int) -> None:
    """A sharded HF folder written one shard at a time (at most one shard in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    marker = folder / ".bench-complete.json"
    spec = {"shape": asdict(shape), "variant": variant, "shard_bytes": shard_bytes, "delta_std": DELTA_STD}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        print(f"  reusing {folder}", flush=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    itemsize = torch.empty((), dtype=shape.torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = _numel(s) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    weight_map = {}
    start = time.perf_counter()
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        state = {name: make_tensor(name, s, variant, shape.torch_dtype) for name, s in shard}
        save_file(state, str(folder / f".{file}.tmp"), metadata={"format": "pt"})
        os.replace(folder / f".{file}.tmp", folder / file)
        weight_map.update({name: file for name, _ in shard})
        del state
    index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False, dtype=shape.dtype,
        architectures=["LlamaForCausalLM"],
    ).save_pretrained(folder)
    marker.write_text(json.dumps(spec))
    print(f"  wrote {folder} ({len(shards)} shards, {shape.nbytes() / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)


# ----------------------------------------------------------------------------- reading outputs


class Reader:
    """Tensors of an HF folder by name through ``safetensors.safe_open`` (independent of sparsemerge's reader)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
            p.name for p in sorted(folder.glob("*.safetensors"))]
        self.handles = {f: safe_open(str(folder / f), "pt") for f in files}
        self.where = {k: f for f, h in self.handles.items() for k in h.keys()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(self.handles[f].get_slice(k).get_shape()) for k, f in self.where.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name).clone()


def complete(out: Path, shape: Shape) -> Optional[str]:
    """None when ``out`` holds every tensor of the model with its shape, else what is wrong."""
    got = Reader(out).shapes()
    want = dict(shape.tensors())
    missing = [k for k in want if k not in got]
    wrong = [k for k in want if k in got and got[k] != want[k]]
    if missing or wrong:
        return f"missing {missing[:3]} wrong shape {wrong[:3]}"
    return None


def check_linear(out: Path, models: list[Path], shape: Shape) -> str:
    r, ins = Reader(out), [Reader(m) for m in models]
    worst = 0.0
    for name in (f"model.layers.{shape.layers // 2}.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        expected = torch.zeros(dict(shape.tensors())[name], dtype=torch.float32)
        for reader, w in zip(ins, LINEAR_WEIGHTS):
            expected += reader.get(name).float() * w
        expected /= sum(LINEAR_WEIGHTS)
        worst = max(worst, float((r.get(name).float() - expected).abs().max()))
    return f"{'ok' if worst <= 1e-6 else 'MISMATCH'}: 3 tensors = sum w_i x_i, max |diff| {worst:.1e}"


def ties_reference(base: torch.Tensor, tuned: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023) as mergekit computes it: trim each task vector to its top
    ``int(density * numel)`` magnitudes, elect the sign of the sum, average the agreeing
    entries (divided by the agreeing weights, all 1 here), add to the base."""
    deltas = []
    for t in tuned:
        tau = (t.float() - base.float()).reshape(-1)
        k = int(density * tau.numel())
        keep = torch.zeros_like(tau)
        keep[torch.argsort(tau.abs(), descending=True)[:k]] = 1
        deltas.append(tau * keep)
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    divisor = agree.sum(0)
    divisor[divisor == 0] = 1
    return (base.float().reshape(-1) + (stacked * agree).sum(0) / divisor).reshape(base.shape)


def check_ties(out: Path, base: Path, tuned: list[Path], shape: Shape) -> str:
    r, b, ts = Reader(out), Reader(base), [Reader(t) for t in tuned]
    differ, total = 0, 0
    for name in (f"model.layers.{shape.layers // 2}.self_attn.q_proj.weight", "model.norm.weight"):
        expected = ties_reference(b.get(name), [t.get(name) for t in ts], TIES_DENSITY)
        got = r.get(name).float()
        differ += int(((got - expected).abs() > 1e-6).sum())
        total += got.numel()
    # the trim's k-th largest magnitude can tie: another choice among equal |tau| is as valid
    ok = differ <= 1e-5 * total
    return f"{'ok' if ok else 'MISMATCH'}: 2 tensors = TIES formula, {differ} of {total:,} entries differ"


def nm_reference(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    groups = weight.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(n, dim=1).indices, True)
    return (groups * keep).reshape(weight.shape)


def check_prune(out: Path, base: Path, shape: Shape) -> str:
    r, b = Reader(out), Reader(base)
    differ = 0
    names = [f"model.layers.{shape.layers // 2}.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    for name in names:
        differ += int((r.get(name) != nm_reference(b.get(name).float())).sum())
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # kept dense
        differ += int((r.get(name) != b.get(name).float()).sum())
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    layers_ok = len(record["layers"]) == 7 * shape.layers and all(x["violations"] == 0 for x in record["layers"])
    ok = differ == 0 and layers_ok
    return f"{'ok' if ok else 'MISMATCH'}: 2 layers = top-2 of 4 |w|, 3 dense unchanged ({differ} differ), {len(record['layers'])} layers 2:4"


def check_pack(out: Path, pruned: Path, shape: Shape) -> str:
    from sparsemerge.formats.model import read_packed

    r = Reader(pruned)
    differ = 0
    names = [f"model.layers.{shape.layers // 2}.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"]
    with read_packed(out) as packed:
        n = len(packed.names())
        for name in names:
            differ += int((packed.get_dense(name) != r.get(name)).sum())
    ok = differ == 0 and n == len(shape.tensors())
    return f"{'ok' if ok else 'MISMATCH'}: 3 tensors decode to the pruned ones ({differ} differ), {n} tensors in the manifest"


# ----------------------------------------------------------------------------- children under a limit


def limiter(kind: str, limit: int) -> Callable[[], None]:
    which = {"as": resource.RLIMIT_AS, "data": resource.RLIMIT_DATA}[kind]

    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(which, (limit, limit))

    return apply


@dataclass
class Run:
    rc: int
    seconds: float
    peak: int  # bytes
    tail: str
    timed_out: bool = False


# A fork of this process would start the command with this process's resident pages counted:
# Linux carries the high-water RSS of the image an exec replaces into the new program's
# ru_maxrss. A small launcher (python -S, ~10 MB) forks the command instead and reports the
# command's own rusage, so the peak is the command's, not this script's.
LAUNCHER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'maxrss_kb': usage.ru_maxrss}))\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n"
)


def run_limited(cmd: list[str], kind: str, limit: int, log: Path, timeout: float = 7200) -> Run:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    report = log.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(report), *cmd], stdout=handle,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=limiter(kind, limit), start_new_session=True)
        try:
            proc.wait(timeout)
            killed = False
        except subprocess.TimeoutExpired:  # e.g. a library that spins when an allocation fails instead of failing
            os.killpg(proc.pid, 9)  # the launcher and the command (its own session)
            proc.wait()
            killed = True
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    peak = json.loads(report.read_text())["maxrss_kb"] * 1024 if report.is_file() else 0
    return Run(proc.returncode, seconds, peak, text[-2000:], killed)


def probe_kind(limit: int, work: Path) -> tuple[str, str]:
    """``("as" | "data", why)``: RLIMIT_AS when the imports fit in half of ``limit``."""
    cmd = [sys.executable, "-c", PROBE]
    res = run_limited(cmd, "as", limit, work / "probe-as.log")
    if res.rc == 0:
        info = json.loads(res.tail.strip().splitlines()[-1])  # kB, as /proc reports them
        peak = info["VmPeak"] * 1024
        if peak <= limit / 2:
            return "as", f"RLIMIT_AS: imports reserve {peak / 1e9:.2f} GB of address space, at most half the limit"
        why = f"imports alone reserve {peak / 1e9:.2f} GB of address space of the {limit / 1e9:.2f} GB"
    else:
        why = f"the imports alone fail under RLIMIT_AS={limit / 1e9:.2f} GB ({res.tail.strip().splitlines()[-1][:100]})"
    return "data", f"RLIMIT_DATA (RLIMIT_AS unusable: {why})"


def baseline(kind: str, limit: int, work: Path) -> Run:
    res = run_limited([sys.executable, "-c", PROBE], kind, limit, work / "probe.log")
    if res.rc != 0:
        raise SystemExit(f"the interpreter and imports fail under the limit: {res.tail}")
    return res


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help=f"scratch folder (default {DEFAULT_WORKDIR})")
    ap.add_argument("--keep", action="store_true", help="keep the models and outputs")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    for field, default in asdict(Shape()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="input shard size (default 1 GB)")
    ap.add_argument("--fraction", type=float, default=0.25, help="memory limit / model size (default 0.25)")
    ap.add_argument("--limit-gb", type=float, help="an absolute memory limit instead of --fraction (trying the script on a small model)")
    ap.add_argument("--limit-kind", choices=["auto", "as", "data"], default="auto")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a step is killed (default 3600)")
    ap.add_argument("--threads", type=int, help="merge --threads (default: the command's default)")
    args = ap.parse_args(argv)
    shape = Shape(**{f: getattr(args, f) for f in asdict(Shape())})
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown steps {unknown}; choose from {STEPS}")
    size = shape.nbytes()
    limit = int(args.limit_gb * 1e9) if args.limit_gb else int(size * args.fraction)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    need = size * (3 + (1 if "prune" in steps or "pack" in steps else 0) + 1)
    free = shutil.disk_usage(work).free
    have = sum(f.stat().st_size for f in work.rglob("*.safetensors"))
    if free + have < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, need ~{need / 1e9:.1f} GB; use fewer --layers")
    print(f"model: Llama {shape}, {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB), largest tensor {shape.largest() / 1e6:.0f} MB; "
          f"limit {limit / size:.3g} x = {limit / 1e9:.2f} GB", flush=True)

    base, ft1, ft2 = work / "base", work / "ft1", work / "ft2"
    print("generating the checkpoints", flush=True)
    for folder, variant in ((base, 0), (ft1, 1), (ft2, 2)):
        if variant == 0 or any(s.startswith("merge") for s in steps):
            write_checkpoint(folder, shape, variant, int(args.shard_gb * 1e9))

    if args.limit_kind == "auto":
        kind, why = probe_kind(limit, work)
    else:
        kind, why = args.limit_kind, f"RLIMIT_{args.limit_kind.upper()} (--limit-kind)"
    print(f"memory limit: {why}", flush=True)
    base_run = baseline(kind, limit, work)
    rows: list[tuple[str, ...]] = [("interpreter + imports (probe)", "-", f"{limit / 1e9:.2f} GB",
                                    f"{base_run.peak / 1e9:.3f} GB", f"{base_run.peak / size:.3f}", f"{base_run.seconds:.1f}", "-")]
    threads = ["--threads", str(args.threads)] if args.threads else []
    commands: dict[str, tuple[list[str], Path, Callable[[Path], str]]] = {}
    lin_cfg, ties_cfg = work / "linear.yaml", work / "ties.yaml"
    lin_cfg.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(m), "parameters": {"weight": w}} for m, w in zip((base, ft1, ft2), LINEAR_WEIGHTS)]}))
    ties_cfg.write_text(json.dumps({"merge_method": "ties", "base_model": str(base), "dtype": "float32", "models": [
        {"model": str(m), "parameters": {"weight": 1.0, "density": TIES_DENSITY}} for m in (ft1, ft2)]}))
    pruned, packed = work / "pruned", work / "packed"
    commands["merge-linear"] = ([str(SM), "merge", str(lin_cfg), str(work / "merged-linear"), "--no-progress", "--overwrite", *threads],
                                work / "merged-linear", lambda o: check_linear(o, [base, ft1, ft2], shape))
    commands["merge-ties"] = ([str(SM), "merge", str(ties_cfg), str(work / "merged-ties"), "--no-progress", "--overwrite", *threads],
                              work / "merged-ties", lambda o: check_ties(o, base, [ft1, ft2], shape))
    commands["prune"] = ([str(SM), "prune", str(base), str(pruned), "--pattern", "2:4", "--method", "magnitude", "--no-progress", "--overwrite"],
                         pruned, lambda o: check_prune(o, base, shape))
    commands["pack"] = ([str(SM), "pack", str(pruned), str(packed), "--no-progress", "--overwrite"],
                        packed, lambda o: check_pack(o, pruned, shape))
    failed = False
    for step in steps:
        cmd, out, check = commands[step]
        if step == "pack" and not (pruned / "sparsemerge_prune.json").is_file():
            rows.append((step, f"{size / 1e9:.2f} GB", f"{limit / 1e9:.2f} GB", "-", "-", "-", "skipped: no pruned model"))
            continue
        print(f"{step}: {' '.join(cmd)}", flush=True)
        res = run_limited(cmd, kind, limit, work / f"{step}.log", args.timeout)
        if res.timed_out:
            failed = True
            result = f"KILLED after {args.timeout:.0f} s (no progress under the limit)"
        elif res.rc != 0:
            failed = True
            last = [line for line in res.tail.strip().splitlines() if line.strip()][-1:] or [""]
            result = f"FAILED rc={res.rc}: {last[0][:160]}"
            print(res.tail, flush=True)
        else:
            problem = complete(out, shape) if step != "pack" else None
            result = f"INCOMPLETE: {problem}" if problem else check(out)
            failed = failed or not result.startswith("ok")
        peak, ratio = (f"{res.peak / 1e9:.3f} GB", f"{res.peak / size:.3f}") if res.peak else ("- (killed)", "-")
        rows.append((step, f"{size / 1e9:.2f} GB", f"{limit / 1e9:.2f} GB", peak, ratio, f"{res.seconds:.1f}", result))
        print(f"  rc {res.rc}, peak RSS {res.peak / 1e9:.3f} GB, {res.seconds:.1f} s: {result}", flush=True)
        if step.startswith("merge") and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    header = ("step", "model size", "memory limit", "peak RSS", "peak RSS / model", "wall s", "result check")
    print(f"\nmemory limit: {why}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
