"""The end-to-end demo behind ``sparsemerge demo`` (and ``make demo``).

On the bundled SmolLM2-135M and the BBC News text: dense perplexity, then 2:4 pruning with
every registered method (magnitude, gradient-aware, Wanda, SparseGPT, ...), each evaluated
on the same held-out windows. Writes the pruned models, a JSON and a Markdown table and a
bar chart into one output folder, and prints the table.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.eval.report import format_table, markdown_table, plot_perplexity
from sparsemerge.io import atomic_output, load_model, resolve_source, save_model, write_json_atomic

MARKER = "sparsemerge-demo.json"
# Methods shown in order when registered; each row prunes a fresh copy of the dense model.
DEMO_METHODS = ["magnitude", "gradient", "wanda", "sparsegpt"]
# Methods shown under more than one calibration walk: (row label, sequential mode or None = default).
# SparseGPT's default one-pass walk is the fast one; "block" costs ~1.5x the time for a lower
# perplexity, and the packed INT4 model follows whichever row is best.
DEMO_WALKS = {"sparsegpt": [("sparsegpt", None), ("sparsegpt-block", "block")]}


@dataclass
class DemoConfig:
    model: str = "smollm2"
    data: str = "bbc"
    pattern: str = "2:4"
    methods: list[str] = field(default_factory=lambda: list(DEMO_METHODS))
    seqlen: int = 512
    max_windows: int = 8
    nsamples: int = 8
    gradient_nsamples: int = 4
    seed: int = 0
    out: str = "outputs/demo"
    save_models: bool = True
    pack: bool = True
    embedding_quant: str = "int8"  # codec of the dense 2-D tensors (the tied embedding / head) when packing
    # recovery fine-tuning of the best pruned model, distilled from the dense one (0: skip);
    # a short run to show the step - BENCHMARKS.md has longer ones
    recover_steps: int = 16
    recover_batch_size: int = 2
    recover_seqlen: int = 256
    recover_lr: float = 1e-4
    progress: bool = True


@dataclass
class DemoRow:
    name: str
    pattern: str
    sparsity: float
    perplexity: float
    prune_seconds: float
    eval_seconds: float
    folder: Optional[str] = None
    megabytes: Optional[float] = None  # packed file size (the +int4 row)
    dense_megabytes: Optional[float] = None
    speedup: Optional[float] = None  # decoding tokens/s over the dense float32 model
    speedup_a8: Optional[float] = None  # the same with INT8 activations (VNNI kernel)
    perplexity_a8: Optional[float] = None  # perplexity with the decoding kernel's INT8 activations


def prepare_output(out: Path) -> None:
    """The demo may replace its own earlier output folder, never anything else."""
    if out.exists() and not (out / MARKER).is_file():
        raise SparsemergeError(
            f"{str(out)!r} exists and is not an earlier demo output; pass another --out or remove it"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MARKER, {"what": "sparsemerge demo output", "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def run_demo(config: DemoConfig, echo: Callable[[str], None] = print) -> list[DemoRow]:
    from sparsemerge.eval.data import calibration_windows, eval_windows
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.prune import METHODS
    from sparsemerge.prune.api import prune_

    out = Path(config.out)
    prepare_output(out)
    source = resolve_source(config.model)
    echo(f"loading {config.model} ({source.kind}: {source.path}) ...")
    loaded = load_model(source)
    dense_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    windows = eval_windows(loaded.tokenizer, config.data, config.seqlen, config.max_windows)
    echo(f"held-out text: {config.data}, {windows.shape[0]} windows x {config.seqlen} tokens")
    calib = calibration_windows(loaded.tokenizer, config.data, config.nsamples, config.seqlen, config.seed)

    rows: list[DemoRow] = []
    start = time.perf_counter()
    ppl = perplexity(loaded.model, windows, progress=config.progress, desc="dense perplexity")
    rows.append(DemoRow("dense", "-", 0.0, ppl, 0.0, time.perf_counter() - start))
    echo(f"dense: perplexity {ppl:.2f}")

    methods = [m for m in config.methods if m in METHODS]
    runs = [(label, method, walk) for method in methods for label, walk in DEMO_WALKS.get(method, [(method, None)])]
    for label, method, walk in runs:
        loaded.model.load_state_dict(dense_state)
        n_calib = config.gradient_nsamples if method in ("gradient", "taylor") else config.nsamples
        prune_config = {"pattern": config.pattern, "method": method, "progress": config.progress, "seqlen": config.seqlen, "nsamples": n_calib}
        if walk:
            prune_config["sequential"] = walk
        report = prune_(loaded.model, prune_config, tokenizer=loaded.tokenizer, calibration=calib[:n_calib])
        start = time.perf_counter()
        ppl = perplexity(loaded.model, windows, progress=config.progress, desc=f"{label} perplexity")
        eval_seconds = time.perf_counter() - start
        folder = None
        if config.save_models:
            model_name = Path(config.model).name or "model"  # a path given as --model: its last part
            folder = out / f"{model_name}-{label}-{config.pattern.replace(':', 'of')}"
            record = report.to_json()
            record["source"] = {"name": config.model, "kind": source.kind, "sha256": source.checksum()}
            save_model(loaded.model, loaded.tokenizer, folder, overwrite=True, records={"sparsemerge_prune.json": record})
        rows.append(DemoRow(label, config.pattern, report.sparsity, ppl, report.seconds, eval_seconds, str(folder) if folder else None))
        echo(f"{label} {config.pattern}: perplexity {ppl:.2f} (pruned in {report.seconds:.1f} s)")
    loaded.model.load_state_dict(dense_state)
    pruned = [r for r in rows[1:] if r.folder]
    if config.recover_steps > 0 and pruned:
        rows.append(recover_best(min(pruned, key=lambda r: r.perplexity), config, windows, loaded.model, echo))
        pruned = [r for r in rows[1:] if r.folder]
    if config.pack and pruned:
        best = min(pruned, key=lambda r: r.perplexity)
        rows.append(pack_and_run(best, config, windows, loaded.model, echo))
    write_results(out, config, rows)
    return rows


def recover_best(best: DemoRow, config: DemoConfig, windows: torch.Tensor, dense_model: Any, echo: Callable[[str], None]) -> DemoRow:
    """Distil the dense model into the best pruned one for a few steps (train/recover.py) and
    evaluate it on the same windows; the pruned positions stay zero."""
    from sparsemerge.eval.data import load_texts
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.train.recover import RECOVER_RECORD, RecoverConfig, recover_

    student = load_model(best.folder)
    recover_config = RecoverConfig(steps=config.recover_steps, batch_size=config.recover_batch_size, seqlen=config.recover_seqlen,
                                   lr=config.recover_lr, warmup_steps=min(10, config.recover_steps // 4), seed=config.seed,
                                   progress=config.progress)
    report = recover_(student.model, dense_model, student.tokenizer, load_texts(config.data, "calib"), recover_config)
    start = time.perf_counter()
    ppl = perplexity(student.model, windows, progress=config.progress, desc="recovered perplexity")
    eval_seconds = time.perf_counter() - start
    folder = Path(best.folder).with_name(Path(best.folder).name.replace(best.name, f"{best.name}-recovered", 1))
    record = {"config": recover_config.model_dump(), "from": best.folder, **report.to_json()}
    save_model(student.model, student.tokenizer, folder, overwrite=True, records={RECOVER_RECORD: record})
    echo(f"{best.name} + recovery ({report.steps} steps, {report.tokens} tokens, {report.seconds:.1f} s, "
         f"distilled from the dense model): perplexity {best.perplexity:.2f} -> {ppl:.2f}")
    return DemoRow(f"{best.name}+recovered", best.pattern, best.sparsity, ppl, report.seconds, eval_seconds, str(folder))


def _a8_available() -> bool:
    """Whether a registry row with INT8 activations can run on this CPU (under the feature cap)."""
    from sparsemerge.kernels.backends import rows
    from sparsemerge.kernels.features import missing_reason

    return any(r.act_quant == "int8" and missing_reason(r.features) is None for r in rows())


def _decoder(sparse: Any, act_quant: str, prompt: torch.Tensor, tokens: int, echo: Callable[[str], None]) -> Callable[[int], float]:
    """``n -> seconds`` for ``n`` greedy steps after ``prompt``: on the decode runtime when it
    supports the model (the default of ``sparsemerge run``/``bench``), else transformers."""
    from sparsemerge.eval.speed import decode_seconds, engine_decode_seconds
    from sparsemerge.runtime.engine import DecodeEngine
    from sparsemerge.runtime.plan import build_plan

    plan = build_plan(sparse.model, act_quant)
    if not plan.supported:
        echo(f"decode runtime not used ({plan.reason}): timing transformers' forward")
        return lambda n: decode_seconds(sparse.model, prompt, n)
    engine = DecodeEngine(sparse.model, sparse.tokenizer, act_quant, max_seq=prompt.shape[1] + tokens + 8, plan=plan)
    return lambda n: engine_decode_seconds(engine, prompt, n)


def pack_and_run(best: DemoRow, config: DemoConfig, windows: torch.Tensor, dense_model: Any, echo: Callable[[str], None]) -> DemoRow:
    """Pack the best pruned model as N:M + INT4 (group 128; the embedding ``config.embedding_quant``), then measure
    its file size, its perplexity (stored values decoded) and its decoding speed on the
    sparse kernels against the dense float32 model, in this one run."""
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.eval.speed import decode_seconds
    from sparsemerge.formats.model import PackConfig, pack
    from sparsemerge.kernels.model import load_packed, model_bytes
    from sparsemerge.kernels.cpu_vnni import fake_quant_inputs
    from sparsemerge.kernels.sparse_linear import quantize_head_, set_act_quant_

    folder = Path(f"{best.folder}-int4")
    options = PackConfig(format="nm", pattern=config.pattern, metadata="entropy", quant="int4", group_size=128,
                        dense_quant=config.embedding_quant)
    report = pack(best.folder, folder, options, overwrite=True, progress=config.progress)
    file_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.name.startswith(("packed", "sparsemerge")))
    dense_bytes = model_bytes(dense_model)  # float32 parameters, tied ones counted once
    echo(f"packed {best.name} {config.pattern} + INT4 g128 (embedding {config.embedding_quant.upper()}): {file_bytes / 1e6:.1f} MB vs dense float32 {dense_bytes / 1e6:.1f} MB ({file_bytes / dense_bytes:.3f}x) in {report.seconds:.1f} s")
    sparse = load_packed(folder)
    decoded = load_packed(folder, dense=True)
    start = time.perf_counter()
    ppl = perplexity(decoded.model, windows, progress=config.progress, desc="packed perplexity")
    eval_seconds = time.perf_counter() - start
    act_quant = _a8_available()  # an INT8-activation kernel (AVX-512 VNNI, AVX-VNNI or AVX2) can run here
    if act_quant:
        hooks = fake_quant_inputs(decoded.model, sparse.swapped)  # the decoding kernel's activation rounding
        ppl_a8 = perplexity(decoded.model, windows, progress=config.progress, desc="packed perplexity, int8 activations")
        for h in hooks:
            h.remove()
        echo(f"packed perplexity {ppl:.2f}; with the decoding kernel's INT8 activations {ppl_a8:.2f}")
    del decoded
    quantize_head_(sparse.model)  # an output head not stored INT8 becomes INT8 too (~30% of the bytes per token)
    prompt = windows[:1, :32]
    tokens, repeats = 32, 3  # best of 3 x 32 tokens: 16 x 2 moved the ratio by ~10% between runs
    # the baseline on the same decode runtime (dense float32 products: a fair comparison of the
    # weights, not of the frameworks); transformers' own forward is printed beside it
    from types import SimpleNamespace

    decode_seconds(dense_model, prompt, 2)
    hf_dense_s = min(decode_seconds(dense_model, prompt, tokens) for _ in range(repeats))
    dense_timed = _decoder(SimpleNamespace(model=dense_model, tokenizer=None), "none", prompt, tokens, echo)
    dense_timed(2)
    dense_s = min(dense_timed(tokens) for _ in range(repeats))
    echo(f"dense float32: {tokens / dense_s:.1f} tokens/s on the decode runtime, "
         f"{tokens / hf_dense_s:.1f} through transformers' forward")
    speeds = {}
    for mode in ("none", "int8") if act_quant else ("none",):
        set_act_quant_(sparse.model, mode)
        timed = _decoder(sparse, mode, prompt, tokens, echo)
        timed(2)  # warm-up: JIT compile
        speeds[mode] = min(timed(tokens) for _ in range(repeats))
        label = "float activations" if mode == "none" else "INT8 activations"
        echo(
            f"decoding, {label}: packed {tokens / speeds[mode]:.1f} tokens/s vs dense float32 "
            f"{tokens / dense_s:.1f} tokens/s ({dense_s / speeds[mode]:.2f}x, {torch.get_num_threads()} threads)"
        )
    sparse_s = speeds["none"]
    row = DemoRow(f"{best.name}+int4", config.pattern, best.sparsity, ppl, report.seconds, eval_seconds, str(folder))
    row.megabytes = file_bytes / 1e6
    row.dense_megabytes = dense_bytes / 1e6
    row.speedup = dense_s / sparse_s
    if act_quant:
        row.speedup_a8 = dense_s / speeds["int8"]
        row.perplexity_a8 = ppl_a8
    return row


def results_table(rows: list[DemoRow]) -> tuple[list[str], list[list[Any]]]:
    dense = rows[0].perplexity
    headers = ["model", "pattern", "sparsity", "perplexity", "x dense", "prune s", "eval s", "MB", "decode x"]
    body = []
    for r in rows:
        body.append([r.name, r.pattern, r.sparsity, r.perplexity, r.perplexity / dense, r.prune_seconds, r.eval_seconds,
                     r.megabytes if r.megabytes is not None else "-", r.speedup if r.speedup is not None else "-"])
        if r.speedup_a8 is not None:  # the same packed model decoding with INT8 activations
            body.append([f"{r.name} int8-act", r.pattern, r.sparsity, r.perplexity_a8, r.perplexity_a8 / dense, "-", "-",
                         r.megabytes, r.speedup_a8])
    return headers, body


def write_results(out: Path, config: DemoConfig, rows: list[DemoRow]) -> None:
    headers, body = results_table(rows)
    write_json_atomic(out / "results.json", {"config": asdict(config), "rows": [asdict(r) for r in rows]})
    with atomic_output(out / "results.md", overwrite=True, is_dir=False) as tmp:
        tmp.write_text(markdown_table(headers, body))
    with atomic_output(out / "results.txt", overwrite=True, is_dir=False) as tmp:
        tmp.write_text(format_table(headers, body) + "\n")
    plot_perplexity(out / "perplexity.png", rows)
