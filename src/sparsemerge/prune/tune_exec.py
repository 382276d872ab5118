"""Evaluating ``sparsemerge tune`` candidates: one candidate (prune, save, pack, perplexity,
bytes, decode speed) in :func:`evaluate_candidate`, and the three ways of running many -
in this process, in local worker processes (``spawn``), or as Ray tasks on a cluster.

:func:`evaluate_candidate` is a top-level function of plain data (paths, dicts, lists), so it
pickles by reference into a worker process or a Ray task; a failure becomes the row's
``error`` and never stops the sweep. Each evaluation runs on ``settings["threads"]`` CPU
threads (1 by default: parallel workers then do not fight over cores, and every mode measures
the same single-thread speed).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from sparsemerge.errors import SparsemergeError, options_error
from sparsemerge.prune.tune import MB

PRUNE_RECORD = "sparsemerge_prune.json"  # as written by ``sparsemerge prune``
ROW_KEYS = ("index", "label", "method", "allocation", "codec", "target_sparsity", "sparsity", "bytes", "mb", "ppl",
            "ppl_path", "tok_s", "dense_tok_s", "speedup", "speed_path", "seconds", "error")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads (numba follows torch's count in the kernels)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or deprecation notes, and no per-model "transformers
    path" warning of the speed bench (the row's ``ppl_path`` / ``speed_path`` say it), while
    many candidates are built and timed."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    speed_log = logging.getLogger("sparsemerge.eval.speed")
    level = speed_log.level
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    speed_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        speed_log.setLevel(level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def source_dtype(model: str) -> str:
    """Float dtype name of the source's first floating 2-D tensor (what "keep" would store)."""
    from sparsemerge.io import dtype_name, open_tensor_source

    with open_tensor_source(model) as source:
        for name in source.names():
            dtype = source.dtype(name)
            if dtype.is_floating_point and len(source.shape(name)) == 2:
                name = dtype_name(dtype)
                return name if name in ("float32", "float16", "bfloat16") else "float32"
    return "float32"


def prunable_sparsity(model: Any) -> float:
    """Share of zeros over the weights pruning targets by default (Linear layers inside the
    transformer blocks), layers kept dense included: the allocator's "sparsity" budget."""
    from torch import nn

    from sparsemerge.selection import LayerFilter

    selected = LayerFilter.default()
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and selected(name):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


def build_candidate(model: str, candidate: dict[str, Any], out: "str | Path", work: "str | Path", overwrite: bool = False) -> dict[str, Any]:
    """Prune ``model`` with the candidate's recipe (when it has one), save it under ``work``
    and pack it into ``out``; returns ``{"sparsity", "bytes", "kept_dense"}``."""
    from sparsemerge.formats.model import PackConfig, pack

    info: dict[str, Any] = {"sparsity": 0.0}
    src: "str | Path" = model
    if candidate.get("recipe") is not None:
        from sparsemerge.io import load_model, save_model
        from sparsemerge.prune.api import prune_

        loaded = load_model(model)
        report = prune_(loaded.model, {**candidate["recipe"], "progress": False}, tokenizer=loaded.tokenizer)
        info["sparsity"] = prunable_sparsity(loaded.model)
        record = {**report.to_json(), "source": {"name": str(model)}, "tune": {"label": candidate.get("label")}}
        src = Path(work) / "pruned"
        save_model(loaded.model, loaded.tokenizer, src, overwrite=True, records={PRUNE_RECORD: record})
        del loaded
    try:
        config = PackConfig(**candidate["pack"])
    except Exception as exc:  # pydantic.ValidationError
        raise options_error(f"pack options {candidate['pack']}", exc) from None
    report = pack(str(src), out, config, overwrite=overwrite)
    info["bytes"] = int(report.nbytes)
    info["kept_dense"] = len(report.kept_dense)
    return info


def packed_perplexity(packed: "str | Path", windows: Any) -> tuple[float, str]:
    """``(perplexity, path)`` of a packed checkpoint on ``windows`` ``(n, seqlen)``, as
    ``sparsemerge eval ppl`` computes it: on the decode runtime when it supports the model
    (float activations), else its stored values decoded into transformers."""
    import torch

    from sparsemerge.eval.perplexity import engine_perplexity, perplexity
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.runtime.engine import DecodeEngine
    from sparsemerge.runtime.plan import build_plan

    windows = torch.as_tensor(windows, dtype=torch.long)
    loaded = load_packed(packed)
    plan = build_plan(loaded.model, "none")
    if plan.supported:
        engine = DecodeEngine(loaded.model, loaded.tokenizer, "none", max_seq=windows.shape[1], plan=plan)
        return engine_perplexity(engine, windows, progress=False), "runtime"
    loaded = load_packed(packed, dense=True)
    return perplexity(loaded.model, windows, progress=False), f"transformers ({plan.reason})"


def packed_speed(packed: "str | Path", settings: dict[str, Any]) -> dict[str, Any]:
    """Greedy decode tokens/s of the packed model and of its dense float32 version, timed
    interleaved in this process (:func:`sparsemerge.eval.speed.bench_decoding`); speedup =
    dense seconds / these seconds."""
    from sparsemerge.eval.speed import RunSpec, bench_decoding

    spec = RunSpec(str(packed), threads=int(settings.get("threads", 1)))
    with spec.setup():
        sparse, dense = bench_decoding(spec, tokens=int(settings.get("tokens", 16)), prompt_tokens=int(settings.get("prompt_tokens", 8)),
                                       repeats=int(settings.get("repeats", 2)), dense=True, peak_memory=False)
    return {"tok_s": sparse.tokens_per_second, "dense_tok_s": dense.tokens_per_second, "speedup": sparse.x_dense,
            "speed_path": sparse.path}


def _row(candidate: dict[str, Any], index: int) -> dict[str, Any]:
    row: dict[str, Any] = {k: None for k in ROW_KEYS}
    row.update({k: candidate.get(k) for k in ("label", "method", "allocation", "codec", "target_sparsity")})
    row["index"] = index
    return row


def evaluate_candidate(model: str, candidate: dict[str, Any], settings: dict[str, Any], index: int = 0,
                       scratch: Optional[str] = None) -> dict[str, Any]:
    """One candidate end to end -> a plain row (:data:`ROW_KEYS`).

    ``model``: the source (HF folder, file or bundled name); ``candidate``:
    :meth:`Candidate.to_json`; ``settings``: ``windows`` (held-out ids, ``(n, seqlen)`` lists),
    ``threads``, ``tokens``, ``prompt_tokens``, ``repeats``; ``scratch``: folder for the
    temporary pruned and packed models (removed afterwards; default: the system's)."""
    row = _row(candidate, index)
    start = time.perf_counter()
    try:
        with quiet_transformers(), tempfile.TemporaryDirectory(prefix="sparsemerge-tune-", dir=scratch) as tmp, torch_threads(int(settings.get("threads", 1))):
            packed = Path(tmp) / "packed"
            info = build_candidate(model, candidate, packed, tmp)
            row["sparsity"] = info["sparsity"]
            row["bytes"] = info["bytes"]
            row["mb"] = info["bytes"] / MB
            row["ppl"], row["ppl_path"] = packed_perplexity(packed, settings["windows"])
            row.update(packed_speed(packed, settings))
    except Exception as exc:  # noqa: BLE001 - one failed candidate must not stop the sweep
        row["error"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, SparsemergeError):
            row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = time.perf_counter() - start
    return row


# ----------------------------------------------------------------------------- execution
def _init_worker(threads: int) -> None:
    """Process-pool initializer: torch's thread count, and the OpenMP/MKL variables for pools
    started later (numba's count follows torch's in the kernels; NUMBA_NUM_THREADS is left
    alone: numba refuses a change of it once its pool started)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads)


def _failed(candidate: dict[str, Any], index: int, exc: BaseException) -> dict[str, Any]:
    row = _row(candidate, index)
    row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def run_candidates(model: str, candidates: Sequence[dict[str, Any]], settings: dict[str, Any], workers: int = 1,
                   ray_address: Optional[str] = None, scratch: Optional[str] = None, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every candidate; rows in the candidates' order. ``workers`` > 1: a pool of
    local ``spawn`` processes; ``ray_address``: one Ray task per candidate on that cluster
    (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; the model path must be readable there)."""
    from tqdm.auto import tqdm

    if workers < 1:
        raise SparsemergeError(f"--workers must be >= 1, got {workers}")
    if ray_address and workers > 1:
        raise SparsemergeError("choose either --workers N (local processes) or --ray ADDRESS (a Ray cluster), not both")
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    rows: list[Optional[dict[str, Any]]] = [None] * len(candidates)
    bar = tqdm(total=len(candidates), desc="tune", unit="candidate", disable=not progress)

    def done(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        bar.set_postfix_str(str(row.get("label")), refresh=False)
        bar.update(1)

    try:
        if ray_address:
            _run_ray(ray_address, model, candidates, settings, done)
        elif workers == 1:
            for i, c in enumerate(candidates):
                done(i, evaluate_candidate(model, c, settings, i, scratch))
        else:
            _run_processes(workers, model, candidates, settings, scratch, done)
    finally:
        bar.close()
    return [r if r is not None else _failed(c, i, RuntimeError("not evaluated")) for i, (r, c) in enumerate(zip(rows, candidates))]


def _run_processes(workers: int, model: str, candidates: Sequence[dict[str, Any]], settings: dict[str, Any],
                   scratch: Optional[str], done: Any) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = int(settings.get("threads", 1))
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch / numba thread pools
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(evaluate_candidate, model, c, settings, i, scratch): i for i, c in enumerate(candidates)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                row = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died (BrokenProcessPool, out of memory)
                row = _failed(candidates[i], i, exc)
            done(i, row)


def ray_module() -> Any:
    try:
        import ray  # type: ignore
    except ImportError:
        raise SparsemergeError(
            "--ray needs the ray package: pip install 'sparsemerge[ray]' (or pip install 'ray>=2.9'), "
            "on this machine and on every node of the cluster"
        ) from None
    return ray


def _run_ray(address: str, model: str, candidates: Sequence[dict[str, Any]], settings: dict[str, Any], done: Any) -> None:
    ray = ray_module()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own errors
            raise SparsemergeError(f"could not connect to the Ray cluster at {address!r}: {exc}") from None
    try:
        remote = ray.remote(num_cpus=int(settings.get("threads", 1)), max_retries=0)(evaluate_candidate)
        # the held-out windows go to the object store once, not once per task
        shared = ray.put(settings)
        refs = {remote.remote(model, c, shared, i, None): i for i, c in enumerate(candidates)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                i = refs[ref]
                try:
                    row = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a task or its worker failed
                    row = _failed(candidates[i], i, exc)
                done(i, row)
    finally:
        if started:
            ray.shutdown()
