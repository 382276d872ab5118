"""Load a model for sparse execution: a packed checkpoint (``sparsemerge pack``) or a pruned
Hugging Face folder converted on load, with its N:M layers as ``SparseLinear``.

Packed checkpoints are built on the ``meta`` device and filled tensor by tensor, so the
dense weights of packed layers are never allocated; their values, codes and scales are
taken as stored (no re-quantization).
"""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError, options_error
from sparsemerge.kernels.dense_int8 import Int8Embedding, Int8Linear
from sparsemerge.kernels.sparse_linear import SparseLinear, SparsifyConfig, SparsifyReport, sparsify_

log = logging.getLogger(__name__)


@dataclass
class SparseModel:
    model: Any
    tokenizer: Any
    kind: str  # "packed" | "hf-converted" | "dense"
    load_seconds: float
    swapped: list[str] = field(default_factory=list)
    report: Optional[SparsifyReport] = None


def is_packed_folder(path: "str | os.PathLike[str]") -> bool:
    from sparsemerge.formats.model import MANIFEST_NAME

    p = Path(path)
    return p.is_dir() and (p / MANIFEST_NAME).is_file()


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def load_packed(path: "str | os.PathLike[str]", dense: bool = False, verify: bool = True) -> SparseModel:
    """A packed checkpoint as a model: N:M tensors become SparseLinear, hierarchical N:M
    (hnm) ones HierLinear (``dense=True``:
    every tensor decoded to a plain dense model, the baseline of ``bench``)."""
    from sparsemerge.heap import loading_heap

    with loading_heap():  # decoding's large temporaries must not stay in the heap (heap.py)
        return _load_packed(path, dense, verify)


def _load_packed(path: "str | os.PathLike[str]", dense: bool, verify: bool) -> SparseModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsemerge.formats.model import read_packed
    from sparsemerge.formats.hnm import HNMPacked
    from sparsemerge.formats.nm import NMPacked
    from sparsemerge.formats.stacks import StackCollector, stack_entry
    from sparsemerge.io.sources import _load_tokenizer
    from sparsemerge.kernels.hier import HierLinear

    start = time.perf_counter()
    folder = Path(path)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise SparsemergeError(f"packed checkpoint {str(folder)!r} has no usable config.json ({exc}); repack it from an HF folder") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    swapped: list[str] = []
    int8_tables: list[str] = []
    state: dict[str, torch.Tensor] = {}
    expected = {n: tuple(t.shape) for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    stacks, experts = StackCollector(), {}  # MoE experts, one entry per expert (formats/stacks.py)
    with read_packed(folder) as ckpt:
        for name in ckpt.names():
            obj = ckpt.get_format(name, verify=verify)
            stack = stack_entry(ckpt.record(name), f"tensor {name!r}") if hasattr(ckpt, "record") else None
            if stack is not None:
                of, _index, count = stack
                if of not in expected or (count, *obj.shape) != expected[of]:
                    raise SparsemergeError(
                        f"config.json of {str(folder)!r} does not match its weights: {of} is {count} experts of "
                        f"{'x'.join(map(str, obj.shape))} in the checkpoint, the config makes it "
                        f"{'x'.join(map(str, expected.get(of, ()))) or 'no such tensor'}; restore the config.json of the model that was packed"
                    )
                parts = stacks.add(*stack, obj, f"tensor {name!r}")
                if parts is not None:
                    experts[of] = parts
                continue
            if name in expected and tuple(obj.shape) != expected[name]:  # checked before any layer is swapped
                raise SparsemergeError(
                    f"config.json of {str(folder)!r} does not match its weights: {name} is "
                    f"{'x'.join(map(str, obj.shape))} in the checkpoint, the config makes it {'x'.join(map(str, expected[name]))}; "
                    "restore the config.json of the model that was packed"
                )
            module_name = name[: -len(".weight")] if name.endswith(".weight") else None
            module = _get(model, module_name) if module_name else None
            codes = None if dense else _int8_codes(obj)
            if not dense and isinstance(obj, NMPacked) and isinstance(module, nn.Linear):
                _replace(model, module_name, SparseLinear.from_packed(obj, _bias(ckpt, module, module_name, verify)))
                swapped.append(module_name)
            elif not dense and isinstance(obj, HNMPacked) and isinstance(module, nn.Linear):  # hierarchical N:M
                _replace(model, module_name, HierLinear.from_packed(obj, _bias(ckpt, module, module_name, verify)))
                swapped.append(module_name)
            elif codes is not None and isinstance(module, nn.Embedding):  # INT8 table: kept as codes
                _replace(model, module_name, Int8Embedding(*codes, padding_idx=module.padding_idx))
                int8_tables.append(module_name)
            elif codes is not None and isinstance(module, nn.Linear):
                _replace(model, module_name, Int8Linear(codes[0], codes[1], _bias(ckpt, module, module_name, verify), codes[2]))
                swapped.append(module_name)
            else:
                state[name] = obj.to_dense().float()
    stacks.finish()
    swapped += _experts(model, experts, state, dense)
    for name in [k for k in state if k.endswith(".bias") and k[: -len(".bias")] in swapped]:
        del state[name]
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise SparsemergeError(f"packed checkpoint {str(folder)!r} holds tensors the config does not know: {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        table = model.get_input_embeddings()
        head = model.get_output_embeddings()
        if isinstance(table, Int8Embedding) and head is not None:
            # the head reads the table's codes (no float copy of either)
            name = next(n for n, m in model.named_modules() if m is head)
            _replace(model, name, table.tied_head(getattr(head, "bias", None) if not _is_meta(getattr(head, "bias", None)) else None))
            swapped.append(name)
        else:
            model.tie_weights()
    _materialize_rest(model)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if still_meta:
        raise SparsemergeError(f"packed checkpoint {str(folder)!r} lacks tensors {still_meta[:5]}")
    model.eval()
    return SparseModel(model, _load_tokenizer(folder), "dense" if dense else "packed", time.perf_counter() - start, swapped)


def _experts(model: nn.Module, experts: dict, state: dict, dense: bool) -> list[str]:
    """Fused experts modules whose gate_up and down stacks are N:M become SparseExperts (each
    expert's two products on the N:M kernels, no dense copy); other stacks go dense into
    ``state``. Returns the swapped module names."""
    from sparsemerge.formats.nm import NMPacked
    from sparsemerge.merge.moe.sparse import SparseExperts

    swapped = []
    modules = {name.rsplit(".", 1)[0] for name in experts}
    for module_name in sorted(modules):
        gate_up, down = experts.get(f"{module_name}.gate_up_proj"), experts.get(f"{module_name}.down_proj")
        module = _get(model, module_name)
        if (not dense and gate_up is not None and down is not None and hasattr(module, "act_fn")
                and all(isinstance(o, NMPacked) for o in gate_up + down)):
            _replace(model, module_name, SparseExperts([SparseLinear.from_packed(o, None) for o in gate_up],
                                                       [SparseLinear.from_packed(o, None) for o in down], module.act_fn))
            swapped.append(module_name)
            continue
        for part, objs in (("gate_up_proj", gate_up), ("down_proj", down)):
            if objs is not None:
                state[f"{module_name}.{part}"] = torch.stack([o.to_dense().float() for o in objs])
    return swapped


def _int8_codes(obj) -> "tuple[torch.Tensor, torch.Tensor, int] | None":
    """``(codes, scale, group_size)`` of a dense 2-D tensor stored as symmetric INT8/INT4
    codes with groups along its rows (``pack --dense-quant``), else None."""
    from sparsemerge.formats.dense import Dense
    from sparsemerge.formats.quant import QuantizedValues

    values = getattr(obj, "values", None)
    if not (isinstance(obj, Dense) and isinstance(values, QuantizedValues) and len(obj.shape) == 2):
        return None
    if values.zero_point is not None or values.codes.shape != tuple(obj.shape):
        return None
    return values.int8_codes().contiguous(), values.scale.float(), int(values.group_size)


def _bias(ckpt, module: nn.Module, module_name: str, verify: bool) -> Optional[torch.Tensor]:
    if getattr(module, "bias", None) is None:
        return None
    bias_name = module_name + ".bias"
    return ckpt.get_dense(bias_name, verify=verify).float() if bias_name in ckpt else None


def _is_meta(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.device.type == "meta"


def _materialize_rest(model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: rebuild the
    modules that own them from their config, on the CPU."""
    for name, module in list(model.named_modules()):
        own = list(module.named_buffers(recurse=False))
        if own and any(t.device.type == "meta" for _, t in own) and hasattr(module, "config"):
            _replace(model, name, type(module)(module.config))


def _get(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    from sparsemerge.selection import replace_module

    replace_module(model, name, new)


def load_for_run(
    spec: str,
    quant: str = "none",
    group_size: Optional[int] = None,
    pattern: str = "2:4",
    prune: bool = False,
    dense: bool = False,
    head_quant: str = "none",
    act_quant: str = "none",
) -> SparseModel:
    """Packed folder -> SparseLinear model as stored (``quant`` must be 'none' there: the
    codes come from the checkpoint); HF folder / file / 'smollm2' -> loaded, then its N:M
    layers converted with ``quant``. ``dense=True`` gives the dense float32 baseline."""
    from sparsemerge.heap import loading_heap

    with loading_heap():  # conversion's large temporaries must not stay in the heap (heap.py)
        return _load_for_run(spec, quant, group_size, pattern, prune, dense, head_quant, act_quant)


def _load_for_run(spec: str, quant: str, group_size: Optional[int], pattern: str, prune: bool, dense: bool,
                  head_quant: str, act_quant: str) -> SparseModel:
    from sparsemerge.io import load_model

    if is_packed_folder(spec):
        if quant != "none" and not dense:
            raise SparsemergeError(
                f"{spec!r} is a packed checkpoint whose values are already encoded; drop --quant "
                "(re-pack with 'sparsemerge pack --quant ...' to change the codec)"
            )
        loaded = load_packed(spec, dense=dense)
        if head_quant == "int8" and not dense:
            from sparsemerge.kernels.sparse_linear import quantize_head_

            loaded.swapped += quantize_head_(loaded.model)
        elif not dense:
            from sparsemerge.kernels.dense_f32 import use_gemv_

            use_gemv_(loaded.model, SparsifyConfig().head)
        if not dense:
            from sparsemerge.kernels.sparse_linear import set_act_quant_

            set_act_quant_(loaded.model, act_quant)
        return loaded
    try:
        config = SparsifyConfig(pattern=pattern, quant=quant, group_size=group_size, prune=prune, head_quant=head_quant,
                                act_quant=act_quant)
    except ValueError as exc:  # pydantic.ValidationError
        raise options_error("sparse execution options", exc) from None
    start = time.perf_counter()
    loaded = load_model(spec)
    if dense:
        return SparseModel(loaded.model, loaded.tokenizer, "dense", time.perf_counter() - start)
    report = sparsify_(loaded.model, config)
    gc.collect()
    return SparseModel(loaded.model, loaded.tokenizer, "hf-converted", time.perf_counter() - start, report.swapped, report)
