"""Training windows that a step index determines, and the teacher's top-k logits cached once
per training set (issue 14 item 5: distillation on two CPU cores should not run the teacher
again for every recipe, stage and epoch).

* :class:`WindowPool` - ``count`` windows of ``seqlen`` tokens drawn once (seeded) from the
  training text; the windows of step ``t`` are a pure function of ``(seed, t)`` (a seeded
  permutation per epoch), so a resumed run sees exactly the batches the interrupted one would
  have seen, with no generator state to save.
* :class:`TeacherCache` - for every pool window, the teacher's ``k`` largest logits and their
  token ids per position (``float32`` values, ``int32`` ids: ``8 k`` bytes per token) and, for
  each distillation temperature ``T`` the recipe uses, ``logsumexp(z / T)`` over the whole
  vocabulary (4 bytes per token). Saved to a file keyed by the SHA-256 of the windows, the
  teacher's weights, ``k`` and the temperatures; a stale file is rebuilt.
* :func:`topk_kd_loss` - KL over ``k + 1`` buckets: the teacher's top-k tokens and "the rest",
  ``T^2 * mean_tokens [sum_{j in topk} p_j log(p_j / q_j) + p_rest log(p_rest / q_rest)]`` with
  ``p_j = exp(z_j / T - logsumexp(z / T))`` the teacher's true probabilities (not renormalised
  over the top-k), ``p_rest = 1 - sum_j p_j``, and the student's ``q = softmax(z_student / T)``
  at the same tokens, ``q_rest = 1 - sum_j q_j``. It is exactly zero when the student equals the
  teacher and equals :func:`sparsemerge.train.distill.kd_loss` when ``k`` is the vocabulary.
  (Renormalising the teacher over its top-k instead would push the student to move all its mass
  onto those k tokens - at ``T = 2`` SmolLM2's top-64 hold well under half of it - and made a
  recovered model worse than the one-shot one.)
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError

CACHE_VERSION = 2


@dataclass
class WindowPool:
    windows: torch.Tensor  # (count, seqlen) token ids
    seed: int

    @classmethod
    def draw(cls, ids: torch.Tensor, seqlen: int, count: int, seed: int) -> "WindowPool":
        if ids.numel() <= seqlen:
            raise SparsemergeError(f"the training text has {ids.numel()} tokens; need more than seqlen={seqlen}")
        if count < 1:
            raise SparsemergeError(f"the window pool needs at least one window, got {count}")
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seqlen, (count,), generator=generator)
        return cls(torch.stack([ids[s : s + seqlen] for s in starts.tolist()]), seed)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def indices(self, step: int, batch_size: int) -> torch.Tensor:
        """Pool indices of step ``step``'s batch: positions ``step*B .. step*B+B-1`` of an endless
        sequence of seeded permutations of the pool (one per epoch)."""
        count = len(self)
        out = []
        for position in range(step * batch_size, (step + 1) * batch_size):
            epoch, offset = divmod(position, count)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            out.append(int(torch.randperm(count, generator=generator)[offset]))
        return torch.tensor(out, dtype=torch.long)


def _fingerprint(teacher: nn.Module, windows: torch.Tensor, k: int, temperatures: tuple[float, ...]) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION} k={k} T={temperatures}".encode())
    digest.update(windows.to(torch.int64).numpy().tobytes())
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TeacherCache:
    values: torch.Tensor  # (count, seqlen, k) float32
    indices: torch.Tensor  # (count, seqlen, k) int32
    lse: dict[float, torch.Tensor]  # temperature -> (count, seqlen) logsumexp(z / T) over the vocabulary
    key: str

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def batch(self, pool_indices: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, indices, logsumexp)`` of those pool windows at ``temperature``."""
        if temperature not in self.lse:
            raise SparsemergeError(f"the teacher cache holds temperatures {sorted(self.lse)}, not {temperature}")
        return self.values[pool_indices], self.indices[pool_indices].long(), self.lse[temperature][pool_indices]

    @classmethod
    @torch.no_grad()
    def build(cls, teacher: nn.Module, pool: WindowPool, k: int, path: "str | Path | None" = None,
              batch_size: int = 4, progress: bool = True, temperatures: "tuple[float, ...] | list[float]" = (2.0,)) -> "TeacherCache":
        """The cache for ``pool`` (loaded from ``path`` when it matches, else computed and saved there)."""
        if k < 1:
            raise SparsemergeError(f"top-k must be >= 1, got {k}")
        temps = tuple(sorted({float(t) for t in temperatures}))
        if not temps or min(temps) <= 0:
            raise SparsemergeError(f"distillation temperatures must be > 0, got {list(temperatures)}")
        key = _fingerprint(teacher, pool.windows, k, temps)
        if path is not None and Path(path).is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved.get("key") == key:
                    return cls(saved["values"], saved["indices"], dict(zip(temps, saved["lse"])), key)
            except Exception:  # a truncated or foreign file: rebuild it
                pass
        teacher.eval()
        values, indices, lse = [], [], {t: [] for t in temps}
        chunks = range(0, len(pool), batch_size)
        for start in tqdm(chunks, desc=f"teacher top-{k} logits", disable=not progress):
            logits = teacher(input_ids=pool.windows[start : start + batch_size], use_cache=False).logits.float()
            if k > logits.shape[-1]:
                raise SparsemergeError(f"top-k {k} exceeds the vocabulary ({logits.shape[-1]})")
            top = torch.topk(logits, k, dim=-1)
            values.append(top.values)
            indices.append(top.indices.to(torch.int32))
            for t in temps:
                lse[t].append(torch.logsumexp(logits / t, dim=-1))
        cache = cls(torch.cat(values), torch.cat(indices), {t: torch.cat(v) for t, v in lse.items()}, key)
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            torch.save({"key": key, "values": cache.values, "indices": cache.indices,
                        "lse": [cache.lse[t] for t in temps]}, tmp)
            os.replace(tmp, path)
        return cache


TINY = 1e-12


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_lse: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Distillation from cached top-k teacher logits with the rest of the vocabulary as one
    bucket (see the module docstring). Shapes: student ``(..., vocab)``, teacher values/indices
    ``(..., k)``, ``teacher_lse`` ``(...)`` = ``logsumexp(z_teacher / T)``."""
    if student_logits.shape[:-1] != teacher_values.shape[:-1] or teacher_lse.shape != teacher_values.shape[:-1]:
        raise SparsemergeError(f"student logits {tuple(student_logits.shape)} and cached teacher logits "
                               f"{tuple(teacher_values.shape)} cover different tokens")
    if temperature <= 0:
        raise SparsemergeError(f"temperature must be > 0, got {temperature}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices)
    log_p = teacher_values.float() / temperature - teacher_lse.float().unsqueeze(-1)
    p = log_p.exp()
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp_min(TINY)
    head = (p * (log_p - log_q)).sum(-1)
    tail = torch.where(p_rest > TINY, p_rest * (p_rest.clamp_min(TINY).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (head + tail).mean() * temperature**2
