"""Permutation alignment by weight matching (chapter 10.3.5; Ainsworth, Hayase & Srinivasa, 2022,
"Git Re-Basin: Merging Models modulo Permutation Symmetries", algorithm 1).

Hidden units of a network can be reordered - together with every tensor that produces or reads
them - without changing its function. Two models trained from different initialisations compute
similar features in different orders, so their straight-line average is poor (a high loss
barrier, :mod:`sparsemerge.merge.lmc`). Weight matching finds permutations ``P`` of model B's
units that maximise the agreement with model A's weights::

    max_P  sum_l < W_l^A , P_l W_l^B P_{l-1}^T >

Coordinate descent: with all other permutations fixed, the term of one permutation is linear in
it, ``<P, C>`` with ``C[i, j] = sum_t < A_t[unit i], B_t[unit j] >`` over the tensors ``t`` that
touch the units (rows of the producing layer, columns of the reading layer, biases, norms). Each
step solves that linear assignment exactly (``scipy.optimize.linear_sum_assignment``), so the
objective never decreases; the sweep over all permutations (in a seeded random order) repeats
until one sweep changes nothing.

A :class:`PermutationSpec` says which tensor axes belong to which permutation *space*, in *units*
of ``unit`` consecutive entries (an attention head is a unit of ``head_dim`` rows), and which
*moves* (linear assignments) the search makes; a move's position may carry several units of
several spaces (a KV head drags the query heads of its group along). Built for:

* :func:`mlp_spec`: ``nn.Sequential`` of Linear layers and elementwise activations, any depth;
  one space per hidden layer.
* :func:`llama_spec`: Llama / Mistral / Qwen2 / Qwen3 decoders; ``scopes``: ``"mlp"`` (the
  intermediate channels of each block), ``"heads"`` (KV heads with their query-head groups, and
  query heads within each KV group; RoPE and the per-head q/k norms act on every head alike),
  ``"hidden"`` (the residual stream: embedding, norms, every reader and writer, one space).

:func:`align_` permutes model B in place (same function) to match model A; then B can be merged
with A or its connectivity measured (``sparsemerge align``, ``sparsemerge lmc --align``).
Memory: both models' tensors once, plus one working copy of the touched tensors of B.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparsemerge.errors import SparsemergeError

LLAMA_SCOPES = ("mlp", "heads", "hidden")
# Modules that act elementwise on features (or not at all): a permutation of units passes through.
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid,
    nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity,
    nn.Dropout,
)


class AlignConfig(BaseModel):
    """Options of :func:`align_` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    scopes: list[Literal["mlp", "heads", "hidden"]] = Field(default_factory=lambda: list(LLAMA_SCOPES))
    max_iters: int = Field(100, ge=1, description="coordinate-descent sweeps at most")
    seed: int = 0


@dataclass(frozen=True)
class Axis:
    """Axis ``axis`` of tensor ``param`` holds the units of ``space``, ``unit`` entries each."""

    param: str
    axis: int
    space: str
    unit: int = 1


@dataclass(frozen=True)
class Move:
    """One linear assignment over ``size`` positions; position ``p`` stands for units
    ``start + p * per + r`` (``r < per``) of each member ``(space, start, per)``."""

    name: str
    size: int
    members: tuple[tuple[str, int, int], ...]

    def units(self, member: tuple[str, int, int]) -> torch.Tensor:
        """``(size, per)`` unit indices of ``member`` for every position."""
        _, start, per = member
        return start + torch.arange(self.size).reshape(-1, 1) * per + torch.arange(per)


@dataclass
class PermutationSpec:
    spaces: dict[str, int]  # space -> number of units
    axes: list[Axis]
    moves: list[Move]

    def check(self, state: Mapping[str, torch.Tensor], label: str = "model") -> None:
        """Every axis exists with ``units * unit`` entries; every move stays inside its spaces."""
        for a in self.axes:
            if a.param not in state:
                raise SparsemergeError(f"{label} has no tensor {a.param!r} (needed by permutation space {a.space!r})")
            t = state[a.param]
            want = self.spaces[a.space] * a.unit
            if a.axis >= t.dim() or t.shape[a.axis] != want:
                raise SparsemergeError(
                    f"{label}: {a.param} has shape {tuple(t.shape)}, expected {want} entries on axis {a.axis} "
                    f"({self.spaces[a.space]} units of {a.unit} in space {a.space!r})"
                )
        for m in self.moves:
            for member in m.members:
                assert int(m.units(member).max()) < self.spaces[member[0]], (m.name, member)


@dataclass
class Alignment:
    """``perms[space][i]``: the unit of the original B now at position ``i``."""

    perms: dict[str, torch.Tensor]
    iterations: int
    similarity_before: float  # cosine of A and B over the spec's tensors
    similarity_after: float
    moved: dict[str, int] = field(default_factory=dict)  # units not in place per space
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "iterations": self.iterations,
            "similarity_before": round(self.similarity_before, 6),
            "similarity_after": round(self.similarity_after, 6),
            "seconds": round(self.seconds, 3),
            "spaces": {s: {"units": int(p.numel()), "moved": self.moved.get(s, 0)} for s, p in self.perms.items()},
        }


def _gather(t: torch.Tensor, axis: int, units: torch.Tensor, unit: int) -> torch.Tensor:
    """``t`` with the units along ``axis`` reordered: new unit ``i`` = old unit ``units[i]``."""
    index = (units.reshape(-1, 1) * unit + torch.arange(unit)).reshape(-1)
    return t.index_select(axis, index.to(t.device))


def apply_permutation(state: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A new state dict: every axis of the spec gathered by its space's permutation (tensors
    outside the spec are passed through unchanged)."""
    out = dict(state)
    for a in spec.axes:
        perm = perms.get(a.space)
        if perm is not None:
            out[a.param] = _gather(out[a.param], a.axis, perm, a.unit)
    return out


def _rows(t: torch.Tensor, axis: int, n_units: int, units: torch.Tensor) -> torch.Tensor:
    """``(positions, features)``: for each position, the entries of its units along ``axis``, flattened."""
    t = t.movedim(axis, 0)
    t = t.reshape(n_units, -1)[units.reshape(-1)]
    return t.reshape(units.shape[0], -1)


def weight_matching(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    max_iters: int = 100,
    seed: int = 0,
) -> Alignment:
    """Permutations of B's units maximising ``sum_t <A_t, perm(B)_t>`` (Git Re-Basin's weight
    matching); see the module docstring. Ties and float noise: a move is taken only if it gains
    more than ``1e-7`` of the current objective of its units, so the sweeps end."""
    from scipy.optimize import linear_sum_assignment

    start = time.perf_counter()
    spec.check(state_a, "model A")
    spec.check(state_b, "model B")
    params = sorted({a.param for a in spec.axes})
    a_state = {p: state_a[p].detach().float() for p in params}
    b_cur = {p: state_b[p].detach().float() for p in params}
    perms = {s: torch.arange(n) for s, n in spec.spaces.items()}
    by_space: dict[str, list[Axis]] = {}
    for a in spec.axes:
        by_space.setdefault(a.space, []).append(a)

    def similarity() -> float:
        dot = sum(float((a_state[p].double() * b_cur[p].double()).sum()) for p in params)
        na = sum(float(a_state[p].double().square().sum()) for p in params)
        nb = sum(float(b_cur[p].double().square().sum()) for p in params)
        return dot / max((na * nb) ** 0.5, 1e-300)

    before = similarity()
    rng = torch.Generator().manual_seed(seed)
    iterations = 0
    for iterations in range(1, max_iters + 1):
        changed = False
        for k in torch.randperm(len(spec.moves), generator=rng).tolist():
            move = spec.moves[k]
            cost = torch.zeros(move.size, move.size, dtype=torch.float64)
            for member in move.members:
                units = move.units(member)
                for a in by_space.get(member[0], []):
                    n = spec.spaces[a.space]
                    ra = _rows(a_state[a.param], a.axis, n, units)
                    rb = _rows(b_cur[a.param], a.axis, n, units)
                    cost += (ra.double() @ rb.double().T)
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            rel = torch.as_tensor(cols)[torch.as_tensor(rows).argsort()]
            current = float(cost.diagonal().sum())
            gain = float(cost[torch.arange(move.size), rel].sum()) - current
            if gain <= 1e-7 * max(abs(current), 1e-12):
                continue
            changed = True
            for member in move.members:
                space = member[0]
                units = move.units(member)
                local = torch.arange(spec.spaces[space])  # unit map of this step: position <- old position
                local[units.reshape(-1)] = units[rel].reshape(-1)
                perms[space] = perms[space][local]
                for a in by_space.get(space, []):
                    b_cur[a.param] = _gather(b_cur[a.param], a.axis, local, a.unit)
        if not changed:
            break
    moved = {s: int((p != torch.arange(p.numel())).sum()) for s, p in perms.items()}
    return Alignment(perms, iterations, before, similarity(), moved, time.perf_counter() - start)


# --------------------------------------------------------------------------------- specs


def mlp_spec(model: nn.Module) -> PermutationSpec:
    """Spec of an ``nn.Sequential`` of Linear layers and elementwise activations: the outputs of
    every Linear but the last are one space each (rows and bias of that layer, columns of the
    next). Names as in ``model.state_dict()`` (``"0.weight"``)."""
    if not isinstance(model, nn.Sequential):
        raise SparsemergeError(f"MLP alignment needs an nn.Sequential of Linear layers and activations, got {type(model).__name__}")
    linears: list[tuple[str, nn.Linear]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            linears.append((name, child))
        elif isinstance(child, nn.PReLU) and child.num_parameters != 1:
            raise SparsemergeError(f"layer {name}: a per-channel PReLU is not supported by MLP alignment")
        elif isinstance(child, nn.Flatten) and not linears:
            continue  # before the first Linear: acts on the input, which is not permuted
        elif not isinstance(child, ELEMENTWISE):
            raise SparsemergeError(
                f"layer {name} ({type(child).__name__}) is not a Linear or an elementwise activation; "
                "MLP alignment cannot tell how it mixes units"
            )
    if len(linears) < 2:
        raise SparsemergeError("MLP alignment needs at least two Linear layers (one hidden layer)")
    spaces: dict[str, int] = {}
    axes: list[Axis] = []
    moves: list[Move] = []
    for k, ((name, lin), (next_name, nxt)) in enumerate(zip(linears, linears[1:])):
        if lin.out_features != nxt.in_features:
            raise SparsemergeError(f"layer {name} writes {lin.out_features} features but {next_name} reads {nxt.in_features}")
        space = f"{name}.out"
        spaces[space] = lin.out_features
        axes.append(Axis(f"{name}.weight", 0, space))
        if lin.bias is not None:
            axes.append(Axis(f"{name}.bias", 0, space))
        axes.append(Axis(f"{next_name}.weight", 1, space))
        moves.append(Move(space, lin.out_features, ((space, 0, 1),)))
    return PermutationSpec(spaces, axes, moves)


def llama_spec(model: nn.Module, scopes: Sequence[str] = LLAMA_SCOPES) -> PermutationSpec:
    """Spec of a Llama-family decoder (names as in ``model.named_parameters()``, a tied head
    listed once). See the module docstring for the scopes."""
    from sparsemerge.prune.permutation import _check_architecture, _heads, _layers_prefix

    bad = sorted(set(scopes) - set(LLAMA_SCOPES))
    if bad:
        raise SparsemergeError(f"unknown alignment scope(s) {bad}; choose from {', '.join(LLAMA_SCOPES)}")
    core, lm_head = _check_architecture(model, hint="alignment covers the Llama family only")
    names = {id(p): n for n, p in model.named_parameters()}

    def name(param: Optional[torch.Tensor]) -> Optional[str]:
        return None if param is None else names.get(id(param))

    spaces: dict[str, int] = {}
    axes: list[Axis] = []
    moves: list[Move] = []

    def add(param: Optional[torch.Tensor], axis: int, space: str, unit: int = 1) -> None:
        n = name(param)
        if n is not None and not any(a.param == n and a.axis == axis for a in axes):  # tied: once
            axes.append(Axis(n, axis, space, unit))

    prefix = _layers_prefix(model, core.layers)
    for i, layer in enumerate(core.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if "mlp" in scopes:
            space = f"{prefix}.{i}.mlp"
            spaces[space] = mlp.down_proj.in_features
            for lin in (mlp.gate_proj, mlp.up_proj):
                add(lin.weight, 0, space)
                add(lin.bias, 0, space)
            add(mlp.down_proj.weight, 1, space)
            moves.append(Move(space, spaces[space], ((space, 0, 1),)))
        if "heads" in scopes:
            head_dim, n_kv, n_heads = _heads(model, attn)
            group = n_heads // n_kv
            kv, q = f"{prefix}.{i}.self_attn.kv_heads", f"{prefix}.{i}.self_attn.q_heads"
            spaces[kv], spaces[q] = n_kv, n_heads
            for lin in (attn.k_proj, attn.v_proj):
                add(lin.weight, 0, kv, head_dim)
                add(lin.bias, 0, kv, head_dim)
            add(attn.q_proj.weight, 0, q, head_dim)
            add(attn.q_proj.bias, 0, q, head_dim)
            add(attn.o_proj.weight, 1, q, head_dim)
            if n_kv > 1:  # a KV head moves with its group of query heads
                moves.append(Move(kv, n_kv, ((kv, 0, 1), (q, 0, group))))
            if group > 1:
                moves += [Move(f"{q}.group{h}", group, ((q, h * group, 1),)) for h in range(n_kv)]
    if "hidden" in scopes:
        space = "hidden"
        spaces[space] = core.embed_tokens.weight.shape[1]
        add(core.embed_tokens.weight, 1, space)
        add(lm_head.weight, 1, space)
        for n, param in core.named_parameters():
            if param.dim() == 1 and n.endswith("norm.weight") and ".self_attn." not in n:
                add(param, 0, space)
        for layer in core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                add(lin.weight, 1, space)
            for lin in (attn.o_proj, mlp.down_proj):
                add(lin.weight, 0, space)
                add(lin.bias, 0, space)
        moves.append(Move(space, spaces[space], ((space, 0, 1),)))
    return PermutationSpec(spaces, axes, moves)


def spec_for(model: nn.Module, scopes: Sequence[str] = LLAMA_SCOPES) -> PermutationSpec:
    """:func:`mlp_spec` for an ``nn.Sequential``, :func:`llama_spec` for a decoder."""
    if isinstance(model, nn.Sequential):
        return mlp_spec(model)
    return llama_spec(model, scopes)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (a tied one once) and persistent buffers by name."""
    state = dict(model.named_parameters())
    persistent = model.state_dict(keep_vars=True)
    state.update({n: b for n, b in model.named_buffers() if n in persistent})
    return state


@torch.no_grad()
def align_(
    model_a: nn.Module,
    model_b: nn.Module,
    config: "AlignConfig | dict[str, Any] | None" = None,
    **options: Any,
) -> Alignment:
    """Permute ``model_b``'s units in place (its function is unchanged) so that its weights best
    match ``model_a``'s (weight matching). ``config``: :class:`AlignConfig` or its keys (also as
    keyword ``options``). Returns the permutations and the cosine of the two models' weights
    before and after."""
    if config is None or isinstance(config, dict):
        config = AlignConfig(**{**(config or {}), **options})
    elif options:
        config = AlignConfig(**{**config.model_dump(), **options})
    if type(model_a) is not type(model_b):
        raise SparsemergeError(f"cannot align a {type(model_b).__name__} to a {type(model_a).__name__}")
    spec = spec_for(model_a, config.scopes)
    state_a, state_b = _state(model_a), _state(model_b)
    result = weight_matching(state_a, state_b, spec, max_iters=config.max_iters, seed=config.seed)
    for n, t in apply_permutation(state_b, spec, result.perms).items():
        if t is not state_b[n]:
            state_b[n].copy_(t)
    return result


def align_checkpoints(
    model_a: str,
    model_b: str,
    out: str,
    config: "AlignConfig | None" = None,
    overwrite: bool = False,
) -> Alignment:
    """Load A and B (any source :func:`sparsemerge.io.load_model` reads), align B to A and write
    the permuted B as a Hugging Face folder ``out`` (with ``alignment.json``), atomically."""
    from sparsemerge.io import ensure_writable, load_model, save_model

    config = config or AlignConfig()
    ensure_writable(out, overwrite, inputs=[model_a, model_b])
    a, b = load_model(model_a), load_model(model_b)
    result = align_(a.model, b.model, config)
    record = {"model_a": str(model_a), "model_b": str(model_b), "config": config.model_dump(), **result.to_json()}
    save_model(b.model, b.tokenizer, out, overwrite=overwrite, records={"alignment.json": record}, inputs=[model_a, model_b])
    return result
