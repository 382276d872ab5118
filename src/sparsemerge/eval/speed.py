"""Decoding speed: greedy tokens/s of a model with SparseLinear layers against the dense
float32 model, in one process (``sparsemerge bench``, the demo's packed row).

Protocol: the prompt is run once (KV cache filled), then ``tokens`` single-token steps are
timed, each feeding back the argmax; models are warmed up (JIT compile, caches) and timed
interleaved, ``repeats`` times, keeping the best time of each (the least disturbed run).
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

    def __post_init__(self) -> None:
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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

    def as_tuple(self) -> tuple:
        return (self.label, self.kind, self.sparse_layers, self.load_seconds, self.weights_mib, self.peak_mib,
                self.tokens_per_second, self.x_dense)


def load_and_decode(spec: RunSpec, dense: bool, prompt_tokens: int, tokens: int = 4) -> None:
    """Load the model and decode a few tokens after a zero prompt: what running it costs,
    JIT-compiled kernels included (the workload whose peak memory :func:`bench_decoding` measures)."""
    import torch

    with spec.setup():
        loaded = spec.load(dense)
        ids = torch.zeros((1, prompt_tokens), dtype=torch.long, device=spec.device)
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
    loaded = {}
    for label, is_dense in variants:
        gc.collect()
        loaded[label] = spec.load(is_dense)
    torch.manual_seed(0)
    vocab = loaded["sparse"].model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt_tokens), device=spec.device)
    best = {label: float("inf") for label in loaded}
    for label in loaded:  # warm-up (numba compile, caches)
        decode_seconds(loaded[label].model, ids, 2)
    for _ in range(repeats):
        for label in loaded:
            best[label] = min(best[label], decode_seconds(loaded[label].model, ids, tokens))
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
        ))
    return rows
