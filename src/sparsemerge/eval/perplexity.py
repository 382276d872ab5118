"""Perplexity: ``exp(mean token NLL)`` over non-overlapping windows (pruning-literature protocol)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError


@torch.no_grad()
def perplexity(model: Any, windows: torch.Tensor, batch_size: int = 4, progress: bool = True, desc: str = "perplexity") -> float:
    """``windows``: ``(n, seqlen)`` token ids. Each window predicts its tokens 2..seqlen."""
    if int(batch_size) < 1:
        raise SparsemergeError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    bar = tqdm(total=windows.shape[0], desc=desc, disable=not progress, leave=False)
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
        bar.update(batch.shape[0])
    bar.close()
    return math.exp(total_nll / total_tokens)


def engine_perplexity(engine: Any, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity (decode runtime)") -> float:
    """:func:`perplexity` computed by the decode runtime (``sparsemerge.runtime``) token by
    token: each window is decoded from its first token, and every step's logits score the
    next one - the numbers a user's decoding produces (INT8 activations included)."""
    import numpy as np

    from sparsemerge.runtime.sampling import check_finite

    total_nll = 0.0
    total_tokens = 0
    bar = tqdm(total=windows.shape[0], desc=desc, disable=not progress, leave=False)
    for window in windows.tolist():
        engine.reset()
        for t, nxt in zip(window[:-1], window[1:]):
            z = engine.step(t).astype(np.float64)
            check_finite(z)
            m = z.max()
            total_nll += float(m + np.log(np.exp(z - m).sum()) - z[nxt])
        total_tokens += len(window) - 1
        bar.update(1)
    bar.close()
    return math.exp(total_nll / total_tokens)
