"""On-disk and in-model form of a stitched model's seam adapters (:mod:`sparsemerge.merge.stitch`
fits them): ``FOLDER/stitch/adapters.safetensors`` (``layers.<i>.weight`` ``(d, d)``, ``.bias``
``(d,)``) and ``stitch.json`` naming the layers; in a model, a :class:`SeamAdapter` registered on
decoder layer ``i`` as ``stitch_adapter`` maps the hidden states entering that layer (a
forward pre-hook). Lives in ``io`` because loading and saving a model must handle it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError

STITCH_DIR = "stitch"
STITCH_JSON = "stitch.json"
ADAPTERS_FILE = "adapters.safetensors"


class SeamAdapter(nn.Module):
    """``x -> W x + b`` on the residual stream entering a layer; identity at initialisation.
    ``weight`` and ``bias`` are non-persistent buffers: they follow ``.to()`` but stay out of the
    model's state dict and parameters, so a saved or pruned model never mixes them with its own
    tensors (:func:`save_adapters` writes them beside; training marks them ``requires_grad``)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(hidden), persistent=False)
        self.register_buffer("bias", torch.zeros(hidden), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    core = getattr(model, "model", None)
    layers = getattr(core, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SparsemergeError(f"stitching adapters need a decoder with model.layers, got {type(model).__name__}")
    return layers


def attach_adapter_(model: nn.Module, layer: int, adapter: SeamAdapter) -> None:
    """Register ``adapter`` on decoder layer ``layer`` (as its submodule ``stitch_adapter``, so it
    follows ``.to()``) and apply it to the hidden states entering that layer."""
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise SparsemergeError(f"stitch adapter for layer {layer}, but the model has {len(layers)} layers")
    block = layers[layer]
    if hasattr(block, "stitch_adapter"):
        raise SparsemergeError(f"layer {layer} already has a stitch adapter")
    block.stitch_adapter = adapter.to(next(block.parameters()).device)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (module.stitch_adapter(args[0]),) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = module.stitch_adapter(kwargs["hidden_states"])
        return args, kwargs

    block.register_forward_pre_hook(pre_hook, with_kwargs=True)


def has_adapters(folder: "str | Path") -> bool:
    return (Path(folder) / STITCH_DIR / STITCH_JSON).is_file()


def refuse_adapters(ref: Any, what: str) -> None:
    """Tensor-level commands read a folder's weights only; refuse a stitched model rather than
    silently drop its seam adapters."""
    if isinstance(ref, (str, Path)) and Path(ref).is_dir() and has_adapters(ref):
        raise SparsemergeError(
            f"{str(ref)!r} is a stitched model with seam adapters ({STITCH_DIR}/); {what} sees its weights only and "
            "would drop them - use it through commands that load the model (eval, lmc's model A), or stitch again "
            "from its source models"
        )


def install_adapters_(model: nn.Module, folder: "str | Path") -> list[int]:
    """Attach the adapters saved in ``folder/stitch`` to ``model``; returns their layers."""
    from sparsemerge.io.reader import load_safetensors

    stitch = Path(folder) / STITCH_DIR
    try:
        record = json.loads((stitch / STITCH_JSON).read_text())
        state = load_safetensors(stitch / ADAPTERS_FILE)
    except (OSError, ValueError) as exc:
        raise SparsemergeError(f"cannot read the stitch adapters of {str(folder)!r}: {exc}") from exc
    hidden = model.get_input_embeddings().weight.shape[1]
    layers = [int(s["layer"]) for s in record.get("seams", [])]
    for layer in layers:
        adapter = SeamAdapter(hidden)
        w, b = state.get(f"layers.{layer}.weight"), state.get(f"layers.{layer}.bias")
        if w is None or b is None or tuple(w.shape) != (hidden, hidden) or tuple(b.shape) != (hidden,):
            raise SparsemergeError(f"{stitch / ADAPTERS_FILE}: adapter of layer {layer} is missing or not ({hidden}, {hidden}) + ({hidden},)")
        with torch.no_grad():
            adapter.weight.copy_(w)
            adapter.bias.copy_(b)
        attach_adapter_(model, layer, adapter.to(model.get_input_embeddings().weight.dtype))
    return layers


def adapters_of(model: nn.Module) -> dict[int, SeamAdapter]:
    """The seam adapters attached to ``model``'s layers, by layer."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        return {}
    return {i: block.stitch_adapter for i, block in enumerate(layers) if isinstance(getattr(block, "stitch_adapter", None), SeamAdapter)}


def save_adapters(model: nn.Module, folder: "str | Path", record: "dict[str, Any] | None" = None) -> bool:
    """Write ``model``'s seam adapters to ``folder/stitch`` (nothing when it has none)."""
    from sparsemerge.io.writer import save_safetensors

    adapters = adapters_of(model)
    if not adapters:
        return False
    out = Path(folder) / STITCH_DIR
    out.mkdir(exist_ok=True)
    state = {}
    for layer, adapter in adapters.items():
        state[f"layers.{layer}.weight"] = adapter.weight.detach().float().cpu().contiguous()
        state[f"layers.{layer}.bias"] = adapter.bias.detach().float().cpu().contiguous()
    save_safetensors(state, out / ADAPTERS_FILE, metadata={"format": "pt"})
    record = record or {"hidden": int(next(iter(adapters.values())).weight.shape[0]), "seams": [{"layer": k} for k in adapters]}
    (out / STITCH_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return True
