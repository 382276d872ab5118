"""Assemble a mixture of experts from task models (chapter 10.3.8; mergekit-moe's recipe).

Every layer of the output is the base model's layer with its MLP replaced by a sparse MoE
block: expert ``e`` is the MLP of ``experts[e].source_model`` at that layer, the router's rows
come from the prompts (:mod:`.gates`). Attention, norms, embeddings and the LM head are the
base's. Output layouts (tensor names as mergekit-moe writes them with transformers 5):

* Mixtral (no shared expert; Llama or Mistral inputs)::

      model.layers.L.mlp.gate.weight               [E, H]       router
      model.layers.L.mlp.experts.gate_up_proj      [E, 2I, H]   expert e: cat(gate_proj_e, up_proj_e)
      model.layers.L.mlp.experts.down_proj         [E, H, I]

* Qwen2-MoE (one shared expert; Llama, Mistral or Qwen2 inputs): per-expert
  ``mlp.experts.e.{gate,up,down}_proj.weight``, ``mlp.shared_expert.*``, the router
  ``mlp.gate.weight [E, H]`` and the shared expert's sigmoid gate
  ``mlp.shared_expert_gate.weight [1, H]``; q/k/v biases from the base, zeros where it has
  none (Qwen2 attention has them).

Streaming: one layer's expert weights at a time (the fused output tensor), written straight to
their offsets in the output shard (:class:`~sparsemerge.io.writer.ShardedWriter` with a plan);
the output folder appears atomically. ``noise_scale`` adds seeded Gaussian noise to an
expert's MLP weights, ``residual_scale`` multiplies its down projection (mergekit's options).
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import dtype_name
from sparsemerge.io.writer import PlannedTensor, ShardedWriter
from sparsemerge.merge.moe.config import RANDOM_MODES, Expert, MoEConfig, load_moe_config
from sparsemerge.merge.moe.gates import degenerate_layers, expert_gate_fn, prepare_tokenizer, random_gates, stack_gates
from sparsemerge.merge.moe.inputs import MLP_PARTS, MoEInputs, check_inputs

log = logging.getLogger(__name__)

MOE_RECORD = "sparsemerge_moe.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclass
class MoEReport:
    out: Path
    architecture: str
    experts: int
    layers: int
    tensors: int
    gate_mode: str
    seconds: float
    files: list[str] = field(default_factory=list)
    degenerate_layers: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "experts": self.experts, "layers": self.layers, "tensors": self.tensors,
                "gate_mode": self.gate_mode, "seconds": round(self.seconds, 3), "files": self.files,
                "degenerate_layers": self.degenerate_layers}


@dataclass
class _Job:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _expert_tensor(src: Any, name: str, expert: Expert, index: int, seed: int, keep_pattern: Optional[str] = None) -> torch.Tensor:
    """One MLP weight of an expert with mergekit's options: ``+ noise_scale * N(0, 1)`` (seeded
    per expert and tensor), then ``* residual_scale`` for the down projection; then, with
    ``keep_pattern``, ``W * nm_mask(|W|)`` (groups of M along the input dimension)."""
    from sparsemerge.merge.base import seed_for

    tensor = src.get(name)
    if expert.noise_scale is not None:
        gen = torch.Generator().manual_seed(seed_for(seed, f"moe-expert{index}:{name}"))
        tensor = tensor + torch.randn(tensor.shape, generator=gen).to(tensor.dtype) * expert.noise_scale
    if expert.residual_scale is not None and ".down_proj." in name:
        tensor = tensor * expert.residual_scale
    if keep_pattern is not None:
        from sparsemerge.merge.sparsity import project_to_pattern
        from sparsemerge.patterns import parse_pattern

        m = parse_pattern(keep_pattern).m  # type: ignore[union-attr]
        if tensor.shape[-1] % m:
            raise SparsemergeError(f"keep_pattern {keep_pattern}: {name} has {tensor.shape[-1]} inputs, not a multiple of {m}")
        tensor = project_to_pattern(tensor, keep_pattern)
    return tensor


def _config_json(arch: str, base_folder: Path, n_experts: int, top_k: int, inter: int, dtype: Optional[torch.dtype]) -> Any:
    """The output config from the base's, through transformers' config classes as mergekit does
    (Llama -> Mistral -> Mixtral keeps every shared field; sliding windows off)."""
    import transformers

    base = transformers.AutoConfig.from_pretrained(base_folder, trust_remote_code=False)
    if arch == "mixtral":
        if not isinstance(base, transformers.MistralConfig):
            mistral = transformers.MistralConfig(**base.to_dict())
            mistral.sliding_window = None
            mistral.max_position_embeddings = base.max_position_embeddings
            base = mistral
        out = transformers.MixtralConfig(**base.to_dict())
        out.architectures = ["MixtralForCausalLM"]
        out.num_local_experts = n_experts
        out.num_experts_per_tok = top_k
        out.sliding_window = None
    else:
        from transformers.models.qwen2_moe import Qwen2MoeConfig

        out = Qwen2MoeConfig(**base.to_dict())
        out.architectures = ["Qwen2MoeForCausalLM"]
        out.num_experts = n_experts
        out.num_experts_per_tok = top_k
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = inter
        out.moe_intermediate_size = inter
    if dtype is not None:
        out.dtype = dtype
    return out


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # a weights-only folder: fine for random gates
        log.info("no tokenizer in %s (%s)", folder, exc)
        return None


def build_moe(
    config: "MoEConfig | str | Path | dict[str, Any]",
    out: "str | Path",
    overwrite: bool = False,
    allow_identical_experts: bool = False,
    progress: bool = False,
) -> MoEReport:
    """Assemble the MoE that ``config`` (mergekit-moe's YAML) describes into the HF folder ``out``.

    ``allow_identical_experts``: accept experts that are all the same model (mergekit's
    ``--i-understand-this-is-not-useful-without-training``; the MoE then computes what the
    base does, a starting point for training)."""
    from sparsemerge.io import atomic_output, ensure_writable, open_tensor_source

    cfg = load_moe_config(config)
    start = time.perf_counter()
    inputs = cfg.referenced_models()
    ensure_writable(out, overwrite, inputs=inputs)
    if len(cfg.experts) > 1 and len({e.source_model for e in cfg.experts}) == 1 and not allow_identical_experts:
        raise SparsemergeError(
            "every expert is the same model, so the MoE would compute what that model computes at a higher cost; "
            "pass --allow-identical-experts (allow_identical_experts=True) if you will train it"
        )
    sources: dict[str, Any] = {}
    try:
        for ref in inputs:
            sources[ref] = open_tensor_source(ref)
        return _build(cfg, sources, Path(out), overwrite, inputs, start, progress, atomic_output)
    finally:
        for src in sources.values():
            src.close()


def _build(cfg: MoEConfig, sources: dict[str, Any], out: Path, overwrite: bool, inputs: list[str],
           start: float, progress: bool, atomic_output: Any) -> MoEReport:
    base = sources[cfg.base_model]
    ins = check_inputs(cfg, sources)

    gate_experts = list(cfg.experts)
    if cfg.shared_experts:
        gate_experts += cfg.shared_experts

    # The routers (for hidden gates a forward pass of the base per expert: CPU) are computed in a
    # thread while the main thread copies the base and expert tensors (I/O); they are written last.
    work = _RouterWork(cfg, ins, base, gate_experts)
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(work.run)
    try:
        return _write(cfg, ins, sources, out, overwrite, inputs, start, progress, atomic_output, work, future)
    finally:
        work.cancel()
        pool.shutdown(wait=True)


class _RouterWork:
    """The router rows, one expert at a time, from a shared queue. The router thread loads what
    the gate mode needs and takes experts; the main thread, once it has written every other
    tensor, takes the rest too (when torch's threads leave a core free: with one torch thread on
    two cores, the four SmolLM2 forwards of a four-expert build take ~1.2 s instead of ~2.2 s).
    Each expert's rows come from its own forward pass, so which thread runs it changes no bit."""

    def __init__(self, cfg: MoEConfig, ins: MoEInputs, base: Any, experts: list[Expert]) -> None:
        self.cfg, self.ins, self.base, self.experts = cfg, ins, base, experts
        self.rows: list[Optional[torch.Tensor]] = [None] * len(experts)
        self.row_fn: Optional[Callable[[Expert], torch.Tensor]] = None
        self.ready = threading.Event()
        self.lock = threading.Lock()
        self.next = 0
        self.stopped = False
        self._gates: Optional[torch.Tensor] = None
        self.out_config: Any = None  # the output config.json, built here (a bad base config fails early)

    def run(self) -> None:
        """The router thread: the output config, then prepare and take experts until none are left."""
        try:
            # in this thread, not the main one: its transformers imports would hold the import
            # lock against the main thread's copying; a bad base config fails before the copying ends
            ins = self.ins
            self.out_config = _config_json(ins.arch, ins.base_folder, len(self.cfg.experts), self.cfg.experts_per_token,
                                           ins.intermediate, ins.out_dtype)
            if self.cfg.gate_mode in RANDOM_MODES:
                shape = (self.ins.layers, len(self.experts), self.ins.hidden)
                self._gates = random_gates(self.cfg.gate_mode, shape, self.cfg.seed)
                return
            tokenizer = _load_tokenizer(self.ins.base_folder)
            if tokenizer is not None:
                prepare_tokenizer(tokenizer)
            self.row_fn = expert_gate_fn(self.cfg.gate_mode, self.ins.layers, tokenizer=tokenizer,
                                         embed=lambda: self.base.get("model.embed_tokens.weight"), model_folder=self.ins.base_folder)
        finally:
            self.ready.set()
        self.take()

    def take(self) -> None:
        """Compute rows of experts nobody has started, until none are left."""
        while True:
            with self.lock:
                i = self.next
                if i >= len(self.experts) or self.stopped:
                    return
                self.next += 1
            self.rows[i] = self.row_fn(self.experts[i])  # type: ignore[misc]

    def cancel(self) -> None:
        with self.lock:
            self.stopped = True

    def gates(self, future: Future) -> Callable[[], torch.Tensor]:
        """``() -> [layers, experts, hidden]`` for the main thread: helps, waits, stacks (once)."""

        def get() -> torch.Tensor:
            if self._gates is None:
                self.ready.wait()  # set once the router thread is prepared, or has failed
                if self.row_fn is not None and _spare_core():
                    self.take()
                future.result()  # re-raises the router thread's error
                if self._gates is None:  # the random modes set it directly
                    self._gates = stack_gates(self.rows)  # type: ignore[arg-type]
            return self._gates

        return get


def _spare_core() -> bool:
    """Whether a second forward pass beside the router thread's would not oversubscribe the CPU."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 * torch.get_num_threads() <= cores


def _write(cfg: MoEConfig, ins: MoEInputs, sources: dict[str, Any], out: Path, overwrite: bool, inputs: list[str], start: float,
           progress: bool, atomic_output: Any, work: "_RouterWork", gates_future: Future) -> MoEReport:
    """Plan every output tensor (routers last), then write them in order; config, tokenizer and record beside."""
    gates = work.gates(gates_future)
    base = sources[cfg.base_model]
    arch, layers, hidden, inter, out_dtype = ins.arch, ins.layers, ins.hidden, ins.intermediate, ins.out_dtype
    head, per_layer, tail, base_folder = ins.head, ins.per_layer, ins.tail, ins.base_folder
    n_exp = len(cfg.experts)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(out_dtype) if out_dtype is not None else t

    def dt(name: str, src: Any = base) -> torch.dtype:
        return out_dtype or src.dtype(name)

    def copy(name: str) -> _Job:
        return _Job(name, tuple(base.shape(name)), dt(name), lambda: cast(base.get(name)))

    # hidden gates come out of the bfloat16 model in bfloat16, the others in float32
    gate_dtype = out_dtype or (torch.bfloat16 if cfg.gate_mode.startswith("hidden") else torch.float32)
    jobs: list[_Job] = [copy(n) for n in head]
    router_jobs: list[_Job] = []
    for layer in range(layers):
        jobs += [copy(n) for n in per_layer[layer]]
        if arch == "qwen":
            for p, k in (("q", "q"), ("k", "k"), ("v", "v")):
                bias = f"model.layers.{layer}.self_attn.{p}_proj.bias"
                if bias not in per_layer[layer]:  # Qwen2 attention has q/k/v biases: zeros keep the base's function
                    rows = base.shape(f"model.layers.{layer}.self_attn.{k}_proj.weight")[0]
                    bdt = out_dtype or torch.float32
                    jobs.append(_Job(bias, (rows,), bdt, lambda rows=rows, bdt=bdt: torch.zeros(rows, dtype=bdt)))
        prefix = f"model.layers.{layer}.mlp"
        router_jobs.append(_Job(f"{prefix}.gate.weight", (n_exp, hidden), gate_dtype,
                                lambda layer=layer: gates()[layer, :n_exp].contiguous().to(gate_dtype)))
        src_name = {p: f"{prefix}.{p}.weight" for p in MLP_PARTS}
        if arch == "mixtral":
            e_dtype = out_dtype or sources[cfg.experts[0].source_model].dtype(src_name["gate_proj"])

            def gate_up(layer: int = layer, names: dict[str, str] = src_name, d: torch.dtype = e_dtype) -> torch.Tensor:
                out_t = torch.empty((n_exp, 2 * inter, hidden), dtype=d)
                for e, expert in enumerate(cfg.experts):
                    src = sources[expert.source_model]
                    out_t[e, :inter] = _expert_tensor(src, names["gate_proj"], expert, e, cfg.seed, cfg.keep_pattern).to(d)
                    out_t[e, inter:] = _expert_tensor(src, names["up_proj"], expert, e, cfg.seed, cfg.keep_pattern).to(d)
                return out_t

            def down(layer: int = layer, names: dict[str, str] = src_name, d: torch.dtype = e_dtype) -> torch.Tensor:
                out_t = torch.empty((n_exp, hidden, inter), dtype=d)
                for e, expert in enumerate(cfg.experts):
                    out_t[e] = _expert_tensor(sources[expert.source_model], names["down_proj"], expert, e, cfg.seed, cfg.keep_pattern).to(d)
                return out_t

            jobs.append(_Job(f"{prefix}.experts.gate_up_proj", (n_exp, 2 * inter, hidden), e_dtype, gate_up))
            jobs.append(_Job(f"{prefix}.experts.down_proj", (n_exp, hidden, inter), e_dtype, down))
        else:
            owners = [(f"{prefix}.experts.{e}", expert, e) for e, expert in enumerate(cfg.experts)]
            owners.append((f"{prefix}.shared_expert", cfg.shared_experts[0], n_exp))  # type: ignore[index]
            for out_prefix, expert, e in owners:
                src = sources[expert.source_model]
                for part in MLP_PARTS:
                    name = src_name[part]
                    jobs.append(_Job(f"{out_prefix}.{part}.weight", tuple(src.shape(name)), dt(name, src),
                                     lambda src=src, name=name, expert=expert, e=e: cast(_expert_tensor(src, name, expert, e, cfg.seed, cfg.keep_pattern))))
            router_jobs.append(_Job(f"{prefix}.shared_expert_gate.weight", (1, hidden), gate_dtype,
                                    lambda layer=layer: gates()[layer, n_exp:].contiguous().to(gate_dtype)))
    jobs += [copy(n) for n in tail] + router_jobs

    plan = [PlannedTensor(j.name, j.shape, j.dtype) for j in jobs]
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        metadata = {"format": "pt", "merged_by": "sparsemerge", "moe_layout": arch}
        writer = ShardedWriter(tmp, cfg.shard_bytes, plan=plan, metadata=metadata, layout="plan")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc=f"moe {arch}", unit="tensor")
        try:
            for job in jobs:
                if gates_future.done() and gates_future.exception() is not None:
                    raise gates_future.exception()  # type: ignore[misc]  # fail early, not after the copying
                writer.write(job.name, job.make())
                if bar is not None:
                    bar.update(1)
            writer.finish()
        finally:
            writer.close()
            if bar is not None:
                bar.close()
        gates()  # the router thread is done (or its error is raised here)
        work.out_config.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base_folder / name).is_file():
                shutil.copyfile(base_folder / name, tmp / name)
        degenerate = degenerate_layers(gates())
        if degenerate:
            log.warning("layers %s have degenerate router rows (the prompts are too similar); some experts will be rarely used", degenerate)
        report = MoEReport(out, arch, n_exp, layers, len(jobs), cfg.gate_mode, 0.0, list(writer.files), degenerate)
        report.seconds = time.perf_counter() - start
        record = {"config": cfg.model_dump(exclude_none=True), "expert_names": expert_names(cfg), **report.to_json(),
                  "dtype": dtype_name(out_dtype) if out_dtype is not None else None}
        (tmp / MOE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return report


def expert_names(cfg: MoEConfig) -> list[str]:
    """Short display names of the routed experts: the source folder's name, numbered when repeated."""
    names = [Path(e.source_model).name or e.source_model for e in cfg.experts]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names
