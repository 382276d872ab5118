"""Decoding speed: greedy tokens/s of a model with SparseLinear layers against the dense
float32 model, in one process (``sparsemerge bench``, the demo's packed row).

Protocol: the prompt is run once (KV cache filled), then ``tokens`` single-token steps are
timed, each feeding back the argmax; models are warmed up (JIT compile, caches) and timed
interleaved, ``repeats`` times, keeping the best time of each (the least disturbed run).
Models the decode runtime supports (``sparsemerge.runtime``) are timed on it by default
(``RunSpec.runtime = "auto"``); others go through transformers' forward, and the row says why.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Optional

from sparsemerge.errors import SparsemergeError

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
RUNTIMES = ("auto", "off")


def decode_seconds(model: Any, ids: Any, tokens: int) -> float:
    """Seconds for ``tokens`` greedy decoding steps after the prompt ``ids`` ``(1, T)`` (KV cache on)."""
    import torch

    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        if nxt.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


@dataclass(frozen=True)
class RunSpec:
    """How to load a model for running: the options of ``sparsemerge run`` / ``bench``
    (:func:`sparsemerge.kernels.model.load_for_run`), plus the kernel, threads and device.
    Picklable, so a fresh process can load the same model (:mod:`sparsemerge.eval.memory`)."""

    model: str
    quant: str = "none"
    group_size: Optional[int] = None
    pattern: str = "2:4"
    prune: bool = False
    head_quant: str = "none"
    act_quant: str = "none"
    kernel: str = "auto"  # auto, or a kernel registry name forced for every SparseLinear
    threads: Optional[int] = None  # torch/numba threads (None: all cores)
    device: str = "cpu"
    runtime: str = "auto"  # "auto": the decode runtime where it supports the model; "off": transformers
    kv_cache: str = "auto"  # the decode runtime's KV cache precision (runtime.engine.KV_CACHES)

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise SparsemergeError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        from sparsemerge.runtime.engine import resolve_kv_cache

        resolve_kv_cache(self.kv_cache)  # an unknown value, or float16 on a CPU without F16C, fails before loading
        if self.threads is not None and self.threads < 1:
            raise SparsemergeError(f"threads must be >= 1, got {self.threads}")
        if self.device not in DEVICES:
            raise SparsemergeError(f"device must be cpu or cuda, got {self.device!r}")

    def setup(self) -> ContextManager[None]:
        """Apply the thread count and check the device; the returned context forces the kernel
        (an unknown kernel name fails on entering it, with the known list)."""
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise SparsemergeError("device cuda was asked for but no CUDA device is available; use cpu")
        from sparsemerge.kernels.dispatch import force_kernel

        if self.kernel != "auto":
            return force_kernel(self.kernel)
        return contextlib.nullcontext()

    def load(self, dense: bool = False) -> Any:
        """The model as :class:`sparsemerge.kernels.model.SparseModel` (``dense``: the float32 baseline), on the device."""
        import torch

        from sparsemerge.kernels.model import load_for_run

        threads = torch.get_num_threads()
        loaded = load_for_run(self.model, quant=self.quant, group_size=self.group_size, pattern=self.pattern, prune=self.prune,
                              dense=dense, head_quant=self.head_quant, act_quant=self.act_quant)
        # numba kernels run while loading (OpenMP layer) reset torch's OpenMP thread count
        torch.set_num_threads(threads)
        if self.device != "cpu":
            loaded.model.to(self.device)
        return loaded

    def decoder(self, loaded: Any, max_seq: int = 2048) -> tuple[Any, str]:
        """``(DecodeEngine or None, why)``: the decode runtime for ``loaded`` when this spec
        asks for it and the runtime supports the model on this device, else None and the reason
        (the caller then runs transformers' forward)."""
        if self.runtime == "off":
            return None, "the decode runtime is off (--runtime off)"
        if self.device != "cpu":
            return None, f"the decode runtime runs on the CPU, not {self.device}"
        if self.kernel in ("reference", "cuda"):
            return None, f"--kernel {self.kernel} runs through transformers"
        from sparsemerge.runtime.engine import DecodeEngine
        from sparsemerge.runtime.plan import build_plan

        plan = build_plan(loaded.model, self.act_quant)
        if not plan.supported:
            return None, plan.reason
        engine = DecodeEngine(loaded.model, loaded.tokenizer, self.act_quant, max_seq=max_seq, plan=plan, kv_cache=self.kv_cache)
        return engine, "decode runtime"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def engine_decode_seconds(engine: Any, ids: Any, tokens: int) -> float:
    """:func:`decode_seconds` on the decode runtime: the prompt through ``prefill``, then
    ``tokens`` compiled steps each feeding back the argmax."""
    import numpy as np

    engine.reset()
    logits = engine.prefill([int(t) for t in ids[0]])
    start = time.perf_counter()
    for _ in range(tokens):
        logits = engine.step(int(np.argmax(logits)))
    return time.perf_counter() - start


@dataclass
class BenchRow:
    """One model of :func:`bench_decoding`."""

    label: str  # "sparse" | "dense float32"
    kind: str  # SparseModel.kind
    sparse_layers: int
    load_seconds: float
    weights_mib: float  # parameters and buffers (tied ones once)
    peak_mib: float  # peak resident memory of loading + decoding in a fresh process, above the imports (nan: not measured)
    tokens_per_second: float
    x_dense: float  # dense seconds / these seconds (nan without the dense baseline)
    path: str = "transformers"  # "runtime" (the compiled decode runtime) or "transformers"
    why: str = ""  # why this path

    def as_tuple(self) -> tuple:
        return (self.label, self.kind, self.path, self.sparse_layers, self.load_seconds, self.weights_mib, self.peak_mib,
                self.tokens_per_second, self.x_dense)


BENCH_HEADERS = ["model", "kind", "path", "sparse layers", "load s", "weights MiB", "peak RSS +MiB", "tokens/s", "x dense"]


def load_and_decode(spec: RunSpec, dense: bool, prompt_tokens: int, tokens: int = 4) -> None:
    """Load the model and decode a few tokens after a zero prompt: what running it costs,
    JIT-compiled kernels included (the workload whose peak memory :func:`bench_decoding` measures)."""
    import torch

    with spec.setup():
        loaded = spec.load(dense)
        ids = torch.zeros((1, prompt_tokens), dtype=torch.long, device=spec.device)
        engine, _ = spec.decoder(loaded, max_seq=prompt_tokens + tokens + 1)
        if engine is not None:
            engine_decode_seconds(engine, ids, tokens)
        else:
            decode_seconds(loaded.model, ids, tokens)


def bench_decoding(spec: RunSpec, tokens: int = 32, prompt_tokens: int = 16, repeats: int = 3, dense: bool = True,
                   peak_memory: bool = True) -> list[BenchRow]:
    """Tokens/s of ``spec``'s sparse model (and of the dense float32 model when ``dense``),
    timed interleaved after a random prompt (seed 0), best of ``repeats``; with ``peak_memory``
    each model's peak resident memory is measured in a fresh process
    (:func:`sparsemerge.eval.memory.peak_memory`). Run inside ``spec.setup()``."""
    import torch

    from sparsemerge.eval.memory import peak_memory as measure_peak
    from sparsemerge.kernels.model import model_bytes

    if tokens < 1 or repeats < 1 or prompt_tokens < 1:
        raise SparsemergeError(f"tokens, prompt_tokens and repeats must be >= 1, got {tokens}, {prompt_tokens}, {repeats}")
    variants = [("sparse", False)] + ([("dense float32", True)] if dense else [])
    loaded, engines, why = {}, {}, {}
    for label, is_dense in variants:
        gc.collect()
        loaded[label] = spec.load(is_dense)
        engines[label], why[label] = spec.decoder(loaded[label], max_seq=prompt_tokens + tokens + 1)
        if engines[label] is None and spec.runtime == "auto":
            log.warning("%s: transformers path (%s)", label, why[label])
    torch.manual_seed(0)
    vocab = loaded["sparse"].model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), device=spec.device)

    def timed(label: str, n: int) -> float:
        if engines[label] is not None:
            return engine_decode_seconds(engines[label], ids, n)
        return decode_seconds(loaded[label].model, ids, n)

    best = {label: float("inf") for label in loaded}
    for label in loaded:  # warm-up (numba compile, caches)
        timed(label, 2)
    for _ in range(repeats):
        for label in loaded:
            best[label] = min(best[label], timed(label, tokens))
    base = best.get("dense float32")
    peaks: dict[str, Any] = {}
    if peak_memory:
        for label, is_dense in variants:
            peaks[label] = measure_peak(load_and_decode, (spec, is_dense, prompt_tokens))
            if isinstance(peaks[label], str):
                log.warning("peak memory of %s not measured: %s", label, peaks[label])
    rows = []
    for label, item in loaded.items():
        peak = peaks.get(label)
        rows.append(BenchRow(
            label, item.kind, len(item.swapped), item.load_seconds, model_bytes(item.model) / 2**20,
            (peak[1] - peak[0]) / 2**20 if isinstance(peak, tuple) else float("nan"),
            tokens / best[label], base / best[label] if base else float("nan"),
            "runtime" if engines[label] is not None else "transformers", why[label],
        ))
    return rows
