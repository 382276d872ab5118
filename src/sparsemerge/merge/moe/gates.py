"""Router initialisation from prompts (mergekit-moe's gate modes, chapter 10.3.8).

Each expert ``e`` gets one router row per layer ``l``: a direction in the residual stream that
its prompts produce, so that ``softmax(W_l x)`` sends tokens that look like those prompts to it:

    v_e,l = f_l(positive prompts of e) - f_l(negative prompts of e)     (negative term optional)
    W_l[e] = v_e,l / max(||v_e,l||, 1e-8)

``f`` depends on ``gate_mode`` (prompts tokenized as ``bos + prompt``, no other special
tokens, padded on the left with the BOS id, as mergekit does):

* ``hidden`` / ``hidden_last``: the base model (bfloat16, as mergekit loads it) runs the
  batch; ``f_l`` = the hidden state entering layer ``l`` (``hidden_states[l]``, the embedding
  output for ``l = 0``) at the last position, averaged over the prompts;
* ``hidden_avg``: the same averaged over all positions (padding included) first;
* ``cheap_embed``: ``sum over prompts and real tokens of embed[token]``, normalised to unit
  length, the same for every layer (float32; no forward pass);
* ``random`` / ``uniform_random``: no prompts; ``N(0, 1)`` or ``U(-1/sqrt(H), 1/sqrt(H))``
  from a seeded generator (mergekit uses torch's unseeded global one).

Result: ``[layers, experts, hidden]``; rows for routed experts first, then the shared expert's.
"""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.moe.config import RANDOM_MODES, Expert

log = logging.getLogger(__name__)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding with the BOS id as pad (EOS where there is no BOS), as mergekit-moe sets it."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise SparsemergeError("the base model's tokenizer has neither a BOS nor an EOS token to pad prompts with")
    return tokenizer


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> Any:
    """``bos + prompt`` for each prompt, one left-padded batch (``input_ids``, ``attention_mask``)."""
    bos = tokenizer.bos_token or ""
    return tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)


def cheap_embedding(embed: torch.Tensor, batch: Any, num_layers: int) -> torch.Tensor:
    """``sum_{b,s} mask[b,s] embed[ids[b,s]]`` normalised, repeated per layer: ``[layers, hidden]``.

    An embedding lookup in float32 equals mergekit's ``one_hot(ids) @ embed`` exactly (one
    nonzero product per sum) without the ``[batch, seq, vocab]`` one-hot tensor; the two sums
    run in the same order (positions, then prompts), so the result is bit-identical."""
    ids = batch["input_ids"]
    if int(ids.max()) >= embed.shape[0]:
        raise SparsemergeError(f"token id {int(ids.max())} is outside the base's embedding ({embed.shape[0]} rows)")
    h = embed.float()[ids]  # [batch, seq, hidden]
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)  # [1, hidden]
    unit = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit.repeat(num_layers, 1)


def hidden_state_vectors(model: Any, batch: Any, average: bool) -> torch.Tensor:
    """The hidden state entering each layer, at the last position (or averaged over positions),
    averaged over the prompts: ``[layers, hidden]`` in the model's dtype."""
    # the decoder alone: its hidden states are the causal LM's, bit for bit, without the LM head's
    # [batch, seq, vocab] product (a fifth of SmolLM2's forward) that the gates never read
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    with torch.no_grad():
        out = decoder(**batch.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # [layers, batch, seq, hidden]; [-1] is the final norm's output
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def load_hidden_model(folder: Path) -> Any:
    """The base as transformers loads it for hidden-state gates: bfloat16 (mergekit's choice)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, trust_remote_code=False)
    except Exception as exc:
        raise SparsemergeError(f"gate_mode hidden needs the base as a loadable model; loading {str(folder)!r} failed: {exc}") from exc
    model.eval()
    return model


def gate_vectors(
    mode: str,
    experts: Sequence[Expert],
    num_layers: int,
    hidden_size: int,
    *,
    tokenizer: Any = None,
    embed: Optional[Callable[[], torch.Tensor]] = None,
    model_folder: Optional[Path] = None,
    seed: int = 0,
) -> torch.Tensor:
    """Router rows ``[layers, len(experts), hidden]`` for ``mode`` (see the module docstring).

    ``embed`` returns the base's token embedding (cheap_embed); ``model_folder`` is the base's
    HF folder (hidden modes); ``tokenizer`` is needed by every mode with prompts."""
    if mode in RANDOM_MODES:
        return random_gates(mode, (num_layers, len(experts), hidden_size), seed)
    row = expert_gate_fn(mode, num_layers, tokenizer=tokenizer, embed=embed, model_folder=model_folder)
    return stack_gates([row(e) for e in experts])


def random_gates(mode: str, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``N(0, 1)`` (random) or ``U(-1/sqrt(H), 1/sqrt(H))`` (uniform_random), seeded."""
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(shape, generator=gen)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=gen) * 2 * scale - scale


def expert_gate_fn(mode: str, num_layers: int, *, tokenizer: Any = None, embed: Optional[Callable[[], torch.Tensor]] = None,
                   model_folder: Optional[Path] = None) -> Callable[[Expert], torch.Tensor]:
    """A function giving one expert's unit router rows ``[layers, hidden]`` for a prompt mode;
    what it needs (the base model for hidden modes, the embedding for cheap_embed) is loaded
    here, once. The experts' rows are independent: several threads may call it at once."""
    if tokenizer is None:
        raise SparsemergeError(f"gate_mode {mode} tokenizes the prompts, but the base model has no tokenizer; add one to its folder")
    if mode == "cheap_embed":
        assert embed is not None
        table = embed()

        def vec(batch: Any) -> torch.Tensor:
            return cheap_embedding(table, batch, num_layers)

    elif mode in ("hidden", "hidden_last", "hidden_avg"):
        assert model_folder is not None
        model = load_hidden_model(model_folder)
        if model.config.num_hidden_layers != num_layers:
            raise SparsemergeError(f"the base's config says {model.config.num_hidden_layers} layers but its weights have {num_layers}")

        def vec(batch: Any) -> torch.Tensor:
            return hidden_state_vectors(model, batch, average=mode == "hidden_avg")

    else:  # the config validator lists the modes
        raise SparsemergeError(f"unknown gate_mode {mode!r}")

    lock = threading.Lock()  # a fast tokenizer used by two threads at once can fail ("Already borrowed")

    def batch(prompts: Sequence[str]) -> Any:
        with lock:
            return tokenize_prompts(prompts, tokenizer)

    def row(expert: Expert) -> torch.Tensor:
        v = vec(batch(expert.positive_prompts or []))
        if expert.negative_prompts:
            v -= vec(batch(expert.negative_prompts))
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        return v

    return row


def stack_gates(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-expert ``[layers, hidden]`` rows -> ``[layers, experts, hidden]``."""
    return torch.stack(list(rows), dim=0).permute(1, 0, 2)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above
    ``threshold``, mergekit's test): some experts there will rarely be chosen."""
    out = []
    for layer in range(gates.shape[0]):
        if float(torch.linalg.cond(gates[layer].float())) > threshold:
            out.append(layer)
    return out
