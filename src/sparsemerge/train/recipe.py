"""``sparsemerge train RECIPE.yaml``: a language model trained to an N:M pattern in stages,
e.g. the chapter's three-stage recipe (10.1.7):

1. pre-sparsification: dense training with ``beta ||W||_1`` (``method: dense, l1: ...``);
2. hard sparsification: gradual / progressive N:M, SR-STE or dynamic reallocation;
3. recovery: fixed masks, distillation from the original dense model (``method: fixed``).

Every stage's loss is ``kd_weight * L_KD + ce_weight * L_CE`` (+ its regularizers), with
``L_KD`` from the teacher's cached top-k logits (:mod:`sparsemerge.train.teacher_cache`;
``topk: 0`` runs the teacher on every batch instead). All stages draw their batches from one
pool of training windows, so the teacher runs once per training set. The work directory keeps
the teacher cache and a checkpoint (every ``checkpoint_every`` steps and after each stage);
running the same recipe again resumes from it - the result is the one an uninterrupted run
gives. The output is a Hugging Face folder with a pruning record (each layer's pattern), so
``check``, ``pack`` and ``run`` treat it like any pruned model, and a training record.

Example (``examples/train_three_stage.yaml``)::

    model: smollm2
    text: bbc
    batch_size: 4
    seqlen: 128
    stages:
      - {method: dense, steps: 20, l1: 1.0e-3, lr: 5.0e-5}
      - {method: gradual, pattern: "2:4", steps: 60, update_every: 5, lr: 1.0e-4}
      - {method: fixed, pattern: "2:4", steps: 20, lr: 5.0e-5}
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.train.sparse_train import Checkpointer, StageConfig, StageReport, run_stage
from sparsemerge.train.sparse_masks import trainable_weights
from sparsemerge.train.teacher_cache import TeacherCache, WindowPool, topk_kd_loss

TRAIN_RECORD = "sparsemerge_train.json"


class TrainRecipe(BaseModel):
    """A sparse-training recipe (YAML keys; unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="the dense model: HF folder, .safetensors, .gguf or smollm2")
    teacher: Optional[str] = Field(None, description="distillation teacher; default: the model itself, as loaded")
    output: Optional[str] = Field(None, description="output folder (the command line's OUT wins)")
    text: str = "bbc"
    eval: str = Field("bbc", description="held-out text for perplexity ('none' skips it)")
    eval_windows: int = Field(8, ge=1)
    eval_seqlen: int = Field(512, ge=2)
    eval_every: int = Field(0, ge=0, description="held-out perplexity every k steps in the progress bar (0: stage ends only)")
    batch_size: int = Field(4, ge=1)
    seqlen: int = Field(256, ge=2)
    windows: Optional[int] = Field(None, ge=1, description="training windows in the pool (default: one per batch slot)")
    topk: int = Field(64, ge=0, description="teacher logits cached per token (0: run the teacher on every batch)")
    teacher_cache: Optional[str] = Field(None, description="teacher cache file (default: in the work directory)")
    seed: int = 0
    checkpoint_every: int = Field(50, ge=0)
    exclude: list[str] = Field(default_factory=list, description="regexes of layers to keep dense")
    train_embeddings: bool = False
    threads: Optional[int] = Field(None, ge=1, description="torch threads (default: torch's)")
    stages: list[StageConfig]

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[StageConfig]) -> list[StageConfig]:
        if not value:
            raise ValueError("a recipe needs at least one stage")
        if value[-1].method == "dense":
            raise ValueError("the last stage is dense: the result would not be sparse (end with a sparse method)")
        return value

    def training_steps(self) -> int:
        return sum(s.steps for s in self.stages if s.method != "prune")

    def key(self) -> str:
        """Identifies a run for resuming: everything but presentation options."""
        data = self.model_dump(exclude={"output", "eval_every", "threads"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load_recipe(path: "str | Path") -> TrainRecipe:
    from sparsemerge.io.yaml_config import load_yaml_config

    return load_yaml_config(path, TrainRecipe, "training recipe", "'model' and 'stages'")


@dataclass
class TrainResult:
    stages: list[StageReport]
    perplexity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_from: Optional[tuple[int, int]] = None
    pattern: str = ""
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"stages": [s.to_json() for s in self.stages], "perplexity": self.perplexity,
                "seconds": round(self.seconds, 2), "resumed_from": self.resumed_from, "pattern": self.pattern}


def _final_pattern(recipe: TrainRecipe) -> str:
    sparse = [s for s in recipe.stages if s.method != "dense"]
    if not sparse:
        raise SparsemergeError("the recipe has no sparse stage")
    if sparse[-1].method == "prune":
        return str(sparse[-1].pattern)
    return str(sparse[-1].nm)


def train_recipe_(model: nn.Module, tokenizer: Any, recipe: TrainRecipe, workdir: "str | Path",
                  teacher: Optional[nn.Module] = None, progress: bool = True, restart: bool = False) -> TrainResult:
    """Run ``recipe`` on ``model`` in place (see the module docstring). ``teacher``: the dense
    teacher (default: a frozen copy of ``model`` as given); ``restart``: discard a checkpoint."""
    import copy

    from sparsemerge.eval.data import eval_windows, load_texts
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.train.loop import training_tokens

    started = time.perf_counter()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    workdir = Path(workdir)
    checkpointer = Checkpointer(workdir, recipe.checkpoint_every, recipe.key())
    if restart and checkpointer.path.exists():
        checkpointer.path.unlink()
    state = checkpointer.load()
    needs_teacher = any(s.kd_weight > 0 and s.method != "prune" for s in recipe.stages)
    if teacher is None and needs_teacher:
        teacher = copy.deepcopy(model)
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    ids = training_tokens(tokenizer, load_texts(recipe.text, "calib"), recipe.seqlen)
    pool = WindowPool.draw(ids, recipe.seqlen, recipe.windows or max(1, recipe.training_steps() * recipe.batch_size), recipe.seed)
    windows = eval_windows(tokenizer, recipe.eval, recipe.eval_seqlen, recipe.eval_windows) if recipe.eval != "none" else None

    def eval_fn() -> float:
        return perplexity(model, windows, progress=False)

    result = TrainResult([])
    if windows is not None and state is None:
        result.perplexity["start"] = eval_fn()
        if teacher is not None:
            result.perplexity["teacher"] = perplexity(teacher, windows, progress=False)
    cache = None
    if needs_teacher and recipe.topk:
        cache_path = Path(recipe.teacher_cache) if recipe.teacher_cache else workdir / "teacher_topk.pt"
        temperatures = [s.temperature for s in recipe.stages if s.kd_weight > 0 and s.method != "prune"]
        cache = TeacherCache.build(teacher, pool, recipe.topk, cache_path, progress=progress, temperatures=temperatures)

    first_stage, resume = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        result.stages = [StageReport.from_json(r) for r in state["done"]]
        result.perplexity = dict(state.get("perplexity", {}))
        first_stage = int(state["stage"])
        resume = state.get("stage_state")
        result.resumed_from = (first_stage, int(resume["step"]) if resume else 0)

    def save(stage_index: int, stage_state: Optional[dict[str, Any]]) -> None:
        checkpointer.save({"stage": stage_index, "stage_state": stage_state, "model": model.state_dict(),
                           "done": [dict(r.to_json(), losses=r.losses) for r in result.stages],
                           "perplexity": result.perplexity})

    for index in range(first_stage, len(recipe.stages)):
        stage = recipe.stages[index]
        if stage.method == "prune":
            result.stages.append(_prune_stage(model, tokenizer, recipe, stage, progress))
        else:
            weights = trainable_weights(model, include_conv=False, exclude=recipe.exclude, pattern=stage.nm)
            params = _trainable_params(model, recipe.train_embeddings)

            def loss_fn(step: int, stage: StageConfig = stage) -> tuple[torch.Tensor, int]:
                which = pool.indices(step, recipe.batch_size)
                batch = pool.windows[which]
                out = model(input_ids=batch, labels=batch if stage.ce_weight else None, use_cache=False)
                loss = out.loss * stage.ce_weight if stage.ce_weight else 0.0
                if stage.kd_weight:
                    if cache is not None:
                        values, indices, lse = cache.batch(which, stage.temperature)
                        kd = topk_kd_loss(out.logits, values, indices, lse, stage.temperature)
                    else:
                        from sparsemerge.train.distill import kd_loss

                        with torch.no_grad():
                            teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                        kd = kd_loss(out.logits, teacher_logits, stage.temperature)
                    loss = loss + stage.kd_weight * kd
                if not isinstance(loss, torch.Tensor):
                    raise SparsemergeError(f"stage {stage.label!r}: kd_weight and ce_weight are both 0: nothing to minimise")
                return loss, batch.numel()

            def calibrate(count: int = min(len(pool), 16)) -> None:  # input norms for activation-aware masks
                for start in range(0, count, recipe.batch_size):
                    model(input_ids=pool.windows[start : min(count, start + recipe.batch_size)], use_cache=False)

            report, _ = run_stage(model, params, weights, stage, loss_fn, progress=progress,
                                  modules={n: model.get_submodule(n) for n in weights}, calibrate=calibrate,
                                  eval_fn=eval_fn if windows is not None else None, eval_every=recipe.eval_every,
                                  checkpoint=lambda s, i=index: save(i, s),
                                  checkpoint_due=lambda n, steps=stage.steps: checkpointer.due(n, steps), resume=resume)
            resume = None
            result.stages.append(report)
        if windows is not None:
            result.perplexity[f"after {index + 1}: {stage.label}"] = result.stages[-1].evals[-1][1] if result.stages[-1].evals else eval_fn()
        if recipe.checkpoint_every:
            save(index + 1, None)
    for p in model.parameters():
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - started
    result.pattern = _final_pattern(recipe)
    result.layers = _layer_records(model, recipe, result.pattern)
    return result


def _trainable_params(model: nn.Module, train_embeddings: bool) -> list[nn.Parameter]:
    from sparsemerge.train.loop import dense_parameters, set_trainable_

    return set_trainable_(model, dense_parameters(model, train_embeddings))


def _prune_stage(model: nn.Module, tokenizer: Any, recipe: TrainRecipe, stage: StageConfig, progress: bool) -> StageReport:
    from sparsemerge.prune import PruneConfig, prune_

    options = {"pattern": stage.pattern, "progress": progress, "calib": recipe.text, **stage.prune}
    if recipe.exclude:
        options.setdefault("exclude", list(PruneConfig().exclude) + list(recipe.exclude))
    try:
        config = PruneConfig(**options)
    except ValueError as exc:
        raise SparsemergeError(f"stage {stage.label!r}: invalid prune options: {exc}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    report = prune_(model, config, tokenizer=tokenizer)
    return StageReport(stage.label, f"prune:{config.method}", config.pattern, 0, train_seconds=report.seconds,
                       final_density=1.0 - report.sparsity)


def _layer_records(model: nn.Module, recipe: TrainRecipe, pattern: str) -> list[dict[str, Any]]:
    """Per masked layer: name, shape, pattern, sparsity, violations (the pruning record's layer rows)."""
    from sparsemerge.masks import check_pattern

    out = []
    nm = recipe.stages[-1].nm if recipe.stages[-1].method != "prune" else None
    weights = trainable_weights(model, include_conv=False, exclude=recipe.exclude, pattern=nm)
    for name, weight in weights.items():
        report = check_pattern(weight.detach(), pattern)
        out.append({"name": name, "shape": list(weight.shape), "pattern": pattern,
                    "sparsity": round(float((weight == 0).float().mean()), 6), "violations": int(report.violations)})
    return out


def prune_record(result: TrainResult, recipe: TrainRecipe, source: dict[str, Any]) -> dict[str, Any]:
    """The pruning record ``check``/``pack`` read (same keys as ``sparsemerge prune`` writes)."""
    total = sum(int(torch.tensor(layer["shape"]).prod()) for layer in result.layers)
    zeros = sum(layer["sparsity"] * int(torch.tensor(layer["shape"]).prod()) for layer in result.layers)
    return {
        "method": "train:" + "+".join(s.method for s in recipe.stages),
        "pattern": result.pattern,
        "overall_sparsity": round(zeros / max(total, 1), 6),
        "seconds": round(result.seconds, 3),
        "config": recipe.model_dump(),
        "layers": result.layers,
        "skipped": [],
        "source": source,
    }
