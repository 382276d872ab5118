"""Column-permutation search for N:M sparsity (Pool & Yu, "Channel Permutations for N:M
Sparsity", NeurIPS 2021; the greedy channel swaps of NVIDIA ASP, re-derived here).

Problem: given non-negative scores ``S`` (rows x C) - possibly several blocks of rows that
share the same input channels, each with its own N:M - find a column order ``p`` maximising

    kept(p) = sum_blocks sum_rows sum_groups  top-N of the M scores S[r, p[g*M:(g+1)*M]]

i.e. the score an N:M mask keeps once the columns are permuted.

Search: start from the better of the identity and a "stripe" order (columns sorted by total
score, dealt round-robin to the groups, so large columns do not compete inside one group),
then repeat greedy channel swaps: the gain of swapping every pair of positions in different
groups is evaluated at once; the best non-overlapping improving swaps (no group touched
twice, in any block) are applied together; stop when no swap gains or after ``max_iters``.

Swap gain, exactly and vectorised: for a slot ``a`` (position in group ``g``) let ``rest`` be
the other M-1 scores of its group in row r and ``t_a[r]`` the N-th largest of ``rest``. Putting
value ``x`` into slot ``a`` keeps ``top_N(rest) + max(0, x - t_a[r])``. So with
``D[a] = sum_r top_N(rest_a) - top_N(group)`` (<= 0, the loss of removing a's column) and
``U[a, c] = sum_r max(0, S[r, c] - t_a[r])`` (the gain of column c in slot a),

    gain(a, b) = D[a] + D[b] + U[a, p[b]] + U[b, p[a]]      (a, b in different groups).

``U`` is indexed by (slot, column id), so after a round of swaps only the rows of slots whose
group changed are recomputed. ``U`` is the hot spot (rows x C x C per full update): a fused
numba loop computes it (60x torch's broadcast-subtract-clamp-sum on the CPU, no temporaries).

Large row counts (the hidden dimension of a whole model) are subsampled to ``max_rows`` rows
for the search (seeded); the reported kept scores always use every row, and a permutation that
does not beat the identity on all rows is not used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from sparsemerge.errors import SparsemergeError


@dataclass
class ScoreBlock:
    """Rows of scores sharing the permuted columns, pruned ``n`` of every ``m``."""

    scores: torch.Tensor  # (rows, C), non-negative
    n: int
    m: int

    def __post_init__(self) -> None:
        if self.scores.dim() != 2:
            raise SparsemergeError(f"permutation scores must be 2-D (rows, columns), got shape {tuple(self.scores.shape)}")
        if not 0 < self.n <= self.m or self.scores.shape[1] % self.m:
            raise SparsemergeError(
                f"cannot search {self.n}:{self.m} over {self.scores.shape[1]} columns: need 0 < N <= M and M dividing the columns"
            )
        if not torch.isfinite(self.scores).all() or (self.scores < 0).any():
            raise SparsemergeError("permutation scores must be finite and non-negative (e.g. |W|)")


@dataclass
class SearchResult:
    perm: torch.Tensor  # (C,) long: new column i is old column perm[i]
    before: float  # kept score of the identity order (all rows)
    after: float  # kept score of ``perm`` (all rows), >= before
    iterations: int
    swaps: int
    start: str  # "identity" or "stripe"

    @property
    def gain(self) -> float:
        """Relative increase of the kept score."""
        return self.after / self.before - 1.0 if self.before > 0 else 0.0


def kept_score(scores: torch.Tensor, n: int, m: int, perm: "torch.Tensor | None" = None) -> float:
    """Sum of the top-``n`` scores of every group of ``m`` consecutive (permuted) columns."""
    s = scores if perm is None else scores[:, perm]
    rows, cols = s.shape
    return float(s.reshape(rows, cols // m, m).double().topk(n, dim=2).values.sum())


def total_kept(blocks: list[ScoreBlock], perm: "torch.Tensor | None" = None) -> float:
    return sum(kept_score(b.scores, b.n, b.m, perm) for b in blocks)


def stripe_order(blocks: list[ScoreBlock]) -> torch.Tensor:
    """Columns sorted by total score (descending) dealt round-robin over the groups of the
    smallest M: group g gets ranks g, g + G, g + 2G, ..."""
    cols = blocks[0].scores.shape[1]
    total = sum(b.scores.double().sum(0) for b in blocks)
    ranked = torch.sort(total, descending=True, stable=True).indices
    groups = cols // min(b.m for b in blocks)
    # position of rank k: group k % G, slot k // G
    position = (torch.arange(cols) % groups) * (cols // groups) + torch.arange(cols) // groups
    perm = torch.empty(cols, dtype=torch.long)
    perm[position] = ranked
    return perm


@njit(parallel=True, fastmath=True, cache=True, error_model="numpy")
def _relu_sums(s_t: np.ndarray, t_t: np.ndarray, slots: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[a, c] = sum_r max(0, s_t[c, r] - t_t[a, r])`` for ``a`` in ``slots`` (rows last: contiguous)."""
    cols, rows = s_t.shape
    for i in prange(slots.shape[0]):
        a = slots[i]
        t = t_t[a]
        for c in range(cols):
            s = s_t[c]
            acc = np.float32(0.0)
            for r in range(rows):
                acc += max(s[r] - t[r], np.float32(0.0))
            out[a, c] = acc


class _BlockState:
    """Per-block quantities of the current order: D (slot loss), T (slot thresholds), U."""

    def __init__(self, block: ScoreBlock) -> None:
        self.s = block.scores.float()
        self.n, self.m = block.n, block.m
        cols = self.s.shape[1]
        self.group = torch.arange(cols) // self.m
        self.s_t = np.ascontiguousarray(self.s.T.numpy())
        self.u_np = np.zeros((cols, cols), dtype=np.float32)
        self.u = torch.from_numpy(self.u_np)  # shares memory with u_np

    def refresh(self, perm: torch.Tensor, slots: "torch.Tensor | None") -> None:
        """Recompute D and T for the order ``perm``, and the rows ``slots`` of U (all if None)."""
        rows, cols = self.s.shape
        n, m = self.n, self.m
        v = self.s[:, perm].reshape(rows, cols // m, m)
        srt, order = torch.sort(v, dim=2, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(2, order, torch.arange(m).expand_as(order).contiguous())
        kept_in = rank < n  # the slot's own value is among the kept
        below = srt[..., n : n + 1]  # (N+1)-th largest (the search drops blocks with N == M)
        nth = srt[..., n - 1 : n]
        # rest = group without the slot: its N-th largest is the (N+1)-th of the group when the
        # slot was kept, else the group's N-th; its top-N loses (value - (N+1)-th) when kept.
        self.t = torch.where(kept_in, below, nth).reshape(rows, cols)
        self.d = torch.where(kept_in, below - v, torch.zeros_like(v)).reshape(rows, cols).double().sum(0)
        slots = torch.arange(cols) if slots is None else slots
        _relu_sums(self.s_t, np.ascontiguousarray(self.t.T.numpy()), slots.numpy().astype(np.int64), self.u_np)

    def gains(self, perm: torch.Tensor) -> torch.Tensor:
        """(C, C) gain of swapping positions a and b (0 for positions in the same group)."""
        d = self.d.float()
        cross = self.u[:, perm]  # U[a, p[b]]
        g = d.unsqueeze(1) + d.unsqueeze(0) + cross + cross.T
        g[self.group.unsqueeze(1) == self.group.unsqueeze(0)] = 0.0
        return g


def _subsample(blocks: list[ScoreBlock], max_rows: int, generator: torch.Generator) -> list[ScoreBlock]:
    total = sum(b.scores.shape[0] for b in blocks)
    if total <= max_rows:
        return blocks
    out = []
    for b in blocks:
        k = max(1, math.ceil(b.scores.shape[0] * max_rows / total))
        rows = torch.randperm(b.scores.shape[0], generator=generator)[:k].sort().values
        out.append(ScoreBlock(b.scores[rows], b.n, b.m))
    return out


def search_permutation(
    blocks: "list[ScoreBlock] | ScoreBlock",
    max_iters: int = 100,
    max_rows: int = 16384,
    seed: int = 0,
    candidates_per_slot: int = 8,
) -> SearchResult:
    """A column order raising the N:M-kept score of ``blocks`` (never lowering it)."""
    if isinstance(blocks, ScoreBlock):
        blocks = [blocks]
    if not blocks:
        raise SparsemergeError("permutation search needs at least one block of scores")
    cols = blocks[0].scores.shape[1]
    if any(b.scores.shape[1] != cols for b in blocks):
        raise SparsemergeError(f"score blocks disagree on the column count: {[tuple(b.scores.shape) for b in blocks]}")
    if max_iters < 0 or max_rows < 1:
        raise SparsemergeError(f"max_iters must be >= 0 and max_rows >= 1, got {max_iters} and {max_rows}")
    identity = torch.arange(cols)
    before = total_kept(blocks)
    pruned = [b for b in blocks if b.n < b.m]  # N == M keeps everything in any order
    if not pruned:
        return SearchResult(identity, before, before, 0, 0, "identity")
    generator = torch.Generator().manual_seed(seed)
    work = _subsample(pruned, max_rows, generator)
    stripe = stripe_order(work)
    start, perm = ("stripe", stripe) if total_kept(work, stripe) > total_kept(work) else ("identity", identity.clone())
    states = [_BlockState(b) for b in work]
    for st in states:
        st.refresh(perm, None)
    current = total_kept(work, perm)
    eps = 1e-6 * current / cols  # ignore gains at float32 rounding level
    iterations = swaps = 0
    k = min(candidates_per_slot, cols)
    while iterations < max_iters:
        gain = sum(st.gains(perm) for st in states)
        values, partners = gain.topk(k, dim=1)
        order = torch.argsort(values.flatten(), descending=True, stable=True)
        touched = [set() for _ in states]
        accepted: list[tuple[int, int]] = []
        for flat in order.tolist():
            a, j = divmod(flat, k)
            if float(values[a, j]) <= eps:
                break
            b = int(partners[a, j])
            groups = [(a // st.m, b // st.m) for st in states]
            if any(ga in t or gb in t for (ga, gb), t in zip(groups, touched)):
                continue
            for (ga, gb), t in zip(groups, touched):
                t.update((ga, gb))
            accepted.append((a, b))
        if not accepted:
            break
        trial = perm.clone()
        for a, b in accepted:
            trial[a], trial[b] = perm[b], perm[a]
        new = total_kept(work, trial)
        if new <= current:  # float error in the predicted gains: stop at the better order
            break
        perm, current = trial, new
        iterations += 1
        swaps += len(accepted)
        for st, t in zip(states, touched):
            groups = torch.tensor(sorted(t), dtype=torch.long)
            st.refresh(perm, (groups.unsqueeze(1) * st.m + torch.arange(st.m)).flatten())
    after = total_kept(blocks, perm)
    if after <= before:  # the subsample misled the search, or nothing to gain
        return SearchResult(identity, before, before, iterations, 0, "identity")
    return SearchResult(perm, before, after, iterations, swaps, start)
