"""``DecodeEngine``: generate with a packed Llama-family model, one compiled call per token.

At construction the engine turns the plan (``runtime/plan.py``) into flat arrays - the op
table, each kernel kind's weights (the row kernels' byte streams built once, fused q/k/v and
gate/up stacked), RMSNorm weights, RoPE tables taken from the model's own rotary embedding
(so every rope scaling transformers implements is reproduced exactly) - and preallocates the
buffers and the KV cache. The prompt goes through the transformers model (its SparseLinear
layers run the batched kernels) and its keys/values are copied into the cache; every later
token is one ``runtime.step.decode_step`` call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, Optional, Sequence

import numpy as np
import torch
from numba import typed, types
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.runtime import step as S
from sparsemerge.runtime.attention import make_scratch
from sparsemerge.runtime.plan import DecodePlan, UnsupportedModel, build_plan, concat_rows
from sparsemerge.runtime.sampling import SamplingConfig, Sampler

SLACK = 128  # floats of slack behind every output buffer (kernels write whole row quads/blocks)


def _list(ty) -> typed.List:
    return typed.List.empty_list(ty)


# A batched prefill through the transformers model costs ~70 ms before its first token (Python
# per module) and ~1.7 ms per token after; a compiled step ~6-9 ms per token (SmolLM2 2:4 + INT8
# on a Zen 4 core pair: 1 token 49 vs 9 ms, 4 tokens 75 vs 34, 8 tokens 83 vs 66, 16 tokens 90
# vs 137). Up to this many prompt tokens the step is faster.
STEPPED_PREFILL_MAX = 8


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    prompt_seconds: float
    decode_seconds: float
    stop_reason: str  # "eos", "stop string", "length"
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(0, len(self.tokens) - 1)  # the first token comes from the prompt's logits
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


KV_CACHES = ("auto", "float16", "float32")


def resolve_kv_cache(kv_cache: str) -> str:
    """"float16" or "float32" for ``kv_cache`` (see :class:`DecodeEngine`)."""
    from sparsemerge.runtime import half

    if kv_cache not in KV_CACHES:
        raise SparsemergeError(f"kv_cache must be one of {', '.join(KV_CACHES)}, got {kv_cache!r}")
    if kv_cache == "auto":
        return "float16" if half.supported() else "float32"
    if kv_cache == "float16" and not half.supported():
        raise SparsemergeError("this CPU has no hardware float16 conversion (x86-64 F16C or AArch64): "
                               "use kv_cache='float32'")
    return kv_cache


class DecodeEngine:
    """Compiled batch-1 decoding of ``model`` (see module docstring).

    ``act_quant="int8"`` feeds the 2:4 INT8/INT4 layers INT8 activations (the A8 kernels),
    as ``SparseLinear`` does with ``act_quant="int8"``; ``max_seq`` bounds prompt + output.
    ``kv_cache``: the KV cache's precision - "float16" halves its memory and the bytes attention
    reads per token (llama.cpp's default; keys/values rounded to float16, attention itself in
    float32), "float32" keeps transformers' values exactly, "auto" (default) is float16 where
    the CPU converts it in hardware (runtime/half.py), else float32."""

    def __init__(self, model: nn.Module, tokenizer=None, act_quant: str = "none", max_seq: int = 2048,
                 plan: Optional[DecodePlan] = None, kv_cache: str = "auto") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.plan = plan if plan is not None else build_plan(model, act_quant)
        if not self.plan.supported:
            raise UnsupportedModel(self.plan.reason)
        self.act_quant = self.plan.act_quant
        if max_seq < 1:
            raise SparsemergeError(f"max_seq must be >= 1 (prompt + generated tokens), got {max_seq}")
        limit = int(getattr(model.config, "max_position_embeddings", max_seq) or max_seq)
        self.max_seq = min(max_seq, limit)
        self.kv_cache = resolve_kv_cache(kv_cache)
        from sparsemerge.heap import loading_heap

        with loading_heap():  # preparing the streams makes many large temporaries (heap.py)
            self._build_weights()
            self._build_buffers()
        self.pos = 0
        self._entries: dict = {}  # jitted function -> (its argument objects, compiled entry point)

    # ------------------------------------------------------------------ construction
    def _build_weights(self) -> None:
        from sparsemerge.kernels.threads import sync_threads
        from sparsemerge.kernels.dense_int8 import Int8Embedding

        model, c = self.model, self.plan.config
        decoder = model.model
        self.threads = max(1, sync_threads())

        f32_2d, f32_3d, f32_1d = types.float32[:, ::1], types.float32[:, :, ::1], types.float32[::1]
        kw = {
            "a8_stream": _list(types.uint8[:, ::1]), "a8_scale": _list(f32_2d), "a8_corr": _list(types.int32[:, ::1]),
            "f32_vals": _list(f32_1d), "f32_meta": _list(types.uint32[::1]),
            "bq_codes8": _list(types.int8[:, :, :, ::1]), "bq_codes4": _list(types.uint8[:, :, :, ::1]),
            "bq_meta": _list(types.uint32[:, :, ::1]), "bq_scale": _list(f32_3d), "bq_zero": _list(f32_3d),
            "bf_vals": _list(types.float32[:, :, :, ::1]), "bf_meta": _list(types.uint32[:, :, ::1]),
            "df_w": _list(f32_2d), "dq_codes": _list(types.int8[:, ::1]), "dq_scale": _list(f32_2d),
            "biases": _list(f32_1d),
            "bh_vals": _list(types.uint16[:, :, :, ::1]), "bh_meta": _list(types.uint32[:, :, ::1]),
            "bg_float32": _list(types.float32[:, :, :, ::1]), "bg_int8": _list(types.int8[:, :, :, ::1]),
            "bg_uint8": _list(types.uint8[:, :, :, ::1]), "bg_uint16": _list(types.uint16[:, :, :, ::1]),
            "bg_index": _list(types.uint8[:, :, :, ::1]), "bg_scale": _list(f32_3d), "bg_zero": _list(f32_3d),
        }
        a8_par, f32_par, bq_par, dq_par, bh_par = [], [], [], [], []
        self._bg_par: list = []
        self._keep: list = []  # arrays the typed lists view
        L = c["layers"]
        ops = np.full((L, S.SLOTS, S.OP_FIELDS), -1, np.int64)
        a8_in = np.zeros((L + 1, 4), np.int64)
        slot_of = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 4, "up_proj": 5, "down_proj": 6}
        in_of = {0: 0, 1: 0, 2: 0, 3: 2, 4: 1, 5: 1, 6: 3}
        q_rows = c["heads"] * c["head_dim"]
        kv_rows = c["kv_heads"] * c["head_dim"]
        offsets = {0: 0, 1: q_rows, 2: q_rows + kv_rows, 3: 0, 4: 0, 5: c["intermediate"], 6: 0}
        self.max_rows = 0
        self.max_cols = 0
        head_op = np.full(S.OP_FIELDS, -1, np.int64)
        self._row_index: dict[str, int] = {}  # plan row -> its index in its kind's lists (refresh_weights)
        self._kw_lists = kw
        for p in self.plan.layers:
            idx = self._add_op(p, kw, a8_par, f32_par, bq_par, dq_par, bh_par)
            self._row_index[p.name] = idx
            bias = self._add_bias(p, kw)
            self.max_rows = max(self.max_rows, p.rows)
            self.max_cols = max(self.max_cols, p.cols)
            if p.name == "lm_head":
                head_op[:] = (p.kind, idx, 0, p.rows, bias)
                if p.kind == S.KIND_A8:
                    a8_in[L, 0] = 1
                continue
            parts = p.name.split(".")
            layer = int(parts[2])
            first = parts[-1].split("+")[0]
            slot = slot_of[first]
            ops[layer, slot] = (p.kind, idx, offsets[slot], p.rows, bias)
            if p.kind == S.KIND_A8:
                a8_in[layer, in_of[slot]] = 1
        self.ops, self.head_op, self.a8_in = ops, head_op, a8_in
        self.kw = (np.array(a8_par, np.int64).reshape(-1, S.A8_FIELDS), kw["a8_stream"], kw["a8_scale"], kw["a8_corr"],
                   np.array(f32_par, np.int64).reshape(-1, S.F32_FIELDS), kw["f32_vals"], kw["f32_meta"],
                   np.array(bq_par, np.int64).reshape(-1, 4), kw["bq_codes8"], kw["bq_codes4"], kw["bq_meta"],
                   kw["bq_scale"], kw["bq_zero"], kw["bf_vals"], kw["bf_meta"], kw["df_w"],
                   np.array(dq_par, np.int64).reshape(-1, 1), kw["dq_codes"], kw["dq_scale"], kw["biases"],
                   np.array(bh_par, np.int64).reshape(-1, 1), kw["bh_vals"], kw["bh_meta"],
                   np.array(self._bg_par, np.int64).reshape(-1, S.BG_FIELDS), kw["bg_float32"], kw["bg_int8"],
                   kw["bg_uint8"], kw["bg_uint16"], kw["bg_index"], kw["bg_scale"], kw["bg_zero"],
                   np.zeros((self.threads, 3 * S.R), np.float32), np.zeros((self.threads, S.R), np.uint32))
        # norms, embedding, rope
        norms = [t for layer in decoder.layers for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        norms.append(decoder.norm.weight)
        self.norms = np.ascontiguousarray(torch.stack([n.detach().float() for n in norms]).numpy())
        epss = {float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
                for layer in decoder.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)}
        epss.add(float(getattr(decoder.norm, "variance_epsilon", getattr(decoder.norm, "eps", 1e-6))))
        if len(epss) != 1:
            raise UnsupportedModel(f"RMSNorm epsilons differ between layers ({sorted(epss)})")
        self.eps = np.float32(epss.pop())
        emb = decoder.embed_tokens
        dummy2 = np.zeros((1, 1), np.float32)
        if isinstance(emb, Int8Embedding):
            group = emb.group_size or emb.embedding_dim
            self.emb = (dummy2, emb.codes.numpy(), emb.scale.numpy())
            emb_group = group
        elif isinstance(emb, nn.Embedding) and emb.weight.dtype == torch.float32:
            self.emb = (emb.weight.detach().numpy(), np.zeros((1, 1), np.int8), dummy2)
            emb_group = 1
        else:
            raise UnsupportedModel(f"embedding {type(emb).__name__} ({getattr(getattr(emb, 'weight', None), 'dtype', '?')}) "
                                   "is not a float32 or INT8 table")
        self.cfg = np.array([c["hidden"], c["heads"], c["kv_heads"], c["head_dim"], c["intermediate"], L, c["vocab"],
                             self.max_seq, self.threads, c["window"], emb_group], np.int64)
        attn0 = decoder.layers[0].self_attn
        self.scaling = np.float32(getattr(attn0, "scaling", c["head_dim"] ** -0.5))
        self._rope_tables()

    def _rope_tables(self) -> None:
        """cos/sin (max_seq, head_dim/2) from the model's rotary module (any rope scaling)."""
        c = self.plan.config
        rotary = self.model.model.rotary_emb
        hd = c["head_dim"]
        pos = torch.arange(self.max_seq).unsqueeze(0)
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, 1, hd, dtype=torch.float32), pos)
        cos, sin = cos[0].float(), sin[0].float()
        if not torch.allclose(cos[:, : hd // 2], cos[:, hd // 2:]) or not torch.allclose(sin[:, : hd // 2], sin[:, hd // 2:]):
            raise UnsupportedModel("the rotary embedding's two halves differ (not the rotate_half RoPE)")
        self.cos = np.ascontiguousarray(cos[:, : hd // 2].numpy())
        self.sin = np.ascontiguousarray(sin[:, : hd // 2].numpy())

    def _add_op(self, p, kw, a8_par, f32_par, bq_par, dq_par, bh_par) -> int:
        """Append the arrays of plan row ``p`` to its kind's lists; returns the index."""
        from sparsemerge.kernels.dense_int8 import Int8Linear

        layout = None
        if p.kernel.startswith("dense-a8-"):  # a dense INT8 layer (the head) with INT8 activations
            from sparsemerge.kernels import dense_a8

            module = p.modules[0]
            plan = dense_a8.prepare(module.codes, module.scale, module.group_size)
            kw["a8_stream"].append(plan["stream"])
            kw["a8_scale"].append(plan["scale"])
            kw["a8_corr"].append(plan["corr"])
            a8_par.append((plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"],
                           dense_a8.address(p.kernel[len("dense-a8-"):])))
            return len(a8_par) - 1
        if p.kind in (S.KIND_A8, S.KIND_F32, S.KIND_BQ, S.KIND_BF, S.KIND_BH, S.KIND_BG):
            layouts = [m.layout for m in p.modules]
            layout = layouts[0] if len(layouts) == 1 else concat_rows(layouts)
        if p.kind in (S.KIND_A8, S.KIND_F32):
            from sparsemerge.kernels import cpu_gather
            from sparsemerge.runtime.kernels import address, decode_kernel

            dk = decode_kernel(p.kernel, layout)
            plan = dk.prepare(layout)
            fn = address(dk.functions()[layout.codec if p.kind == S.KIND_A8 else "f32"])
            if p.kind == S.KIND_A8:
                kw["a8_stream"].append(plan["stream"])
                kw["a8_scale"].append(plan["scale"])
                kw["a8_corr"].append(plan["corr"])
                a8_par.append((plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"], fn))
                return len(a8_par) - 1
            kw["f32_vals"].append(plan["vals"])
            kw["f32_meta"].append(plan["meta"])
            f32_par.append((plan["units"], -(-layout.rows // 4), cpu_gather.BLOCK_UNITS, fn))
            return len(f32_par) - 1
        if p.kind == S.KIND_BQ:
            codes = layout.values.numpy()
            bits4 = layout.codec == "int4"
            lst = kw["bq_codes4"] if bits4 else kw["bq_codes8"]
            lst.append(np.ascontiguousarray(codes))
            kw["bq_meta"].append(layout.meta.numpy().view(np.uint32))
            scale = layout.scale.float().contiguous().numpy()
            kw["bq_scale"].append(scale)
            kw["bq_zero"].append(scale if layout.zero is None else layout.zero.float().contiguous().numpy())
            bq_par.append((int(bits4), int(layout.zero is not None), layout.groups_per_scale, len(lst) - 1))
            return len(bq_par) - 1
        if p.kind == S.KIND_BH:  # float16 / bfloat16 values, widened as they are read
            from sparsemerge.kernels.cpu_general import BF16, F16

            kw["bh_vals"].append(layout.values.contiguous().view(torch.int16).numpy().view(np.uint16))
            kw["bh_meta"].append(layout.meta.numpy().view(np.uint32))
            bh_par.append((BF16 if layout.values.dtype == torch.bfloat16 else F16,))
            return len(bh_par) - 1
        if p.kind == S.KIND_BG:
            return self._add_general(layout, kw)
        if p.kind == S.KIND_BF:
            kw["bf_vals"].append(layout.values.numpy())
            kw["bf_meta"].append(layout.meta.numpy().view(np.uint32))
            return len(kw["bf_vals"]) - 1
        module = p.modules[0]
        if p.kind == S.KIND_DQ:
            assert isinstance(module, Int8Linear)
            kw["dq_codes"].append(module.codes.numpy())
            kw["dq_scale"].append(module.scale.numpy())
            dq_par.append((module.group_size or module.in_features,))
            return len(dq_par) - 1
        kw["df_w"].append(module.weight.detach().contiguous().numpy())  # tied heads share the table
        return len(kw["df_w"]) - 1

    def _refresh_concat(self, p, idx: int) -> bool:
        """Kinds whose arrays are the layers' blocked tensors as they are (fused rows: stacked
        along the block axis, as ``concat_rows``): copy the values, scales and zero points
        straight into them (an unfused layer's arrays are its own buffers: nothing to do).
        False when an array does not have the expected shape (the caller re-derives it)."""
        L = self._kw_lists
        lays = [m.layout for m in p.modules]
        a = lays[0]

        def raw(t: torch.Tensor) -> np.ndarray:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16) if t.dtype in (torch.float16, torch.bfloat16) \
                else t.contiguous().numpy()

        pairs = []  # (target array, field)
        if p.kind == S.KIND_BQ:
            lst = L["bq_codes4"] if a.codec == "int4" else L["bq_codes8"]
            pairs = [(lst[int(self.kw[7][idx, 3])], "values"), (L["bq_scale"][idx], "scale")]
            if a.zero is not None:
                pairs.append((L["bq_zero"][idx], "zero"))
        elif p.kind == S.KIND_BF:
            pairs = [(L["bf_vals"][idx], "values")]
        elif p.kind == S.KIND_BH:
            pairs = [(L["bh_vals"][idx], "values")]
        else:
            which = S.BG_LISTS.index(str(raw(a.values).dtype))
            pairs = [(L[f"bg_{S.BG_LISTS[which]}"][idx], "values")]
            pairs += [(L[f"bg_{f}"][idx], f) for f in ("scale", "zero") if getattr(a, f) is not None]
        for target, fname in pairs:
            parts = [raw(getattr(x, fname)) for x in lays]
            if len(parts) == 1 and np.shares_memory(target, parts[0]):
                continue
            if target.dtype != parts[0].dtype or target.shape != (sum(x.shape[0] for x in parts), *parts[0].shape[1:]):
                return False
            np.concatenate(parts, axis=0, out=target)
        return True

    def _refresh_f32(self, p, idx: int) -> bool:
        """The gather kernels' values are a fixed permutation of the layers' blocked float32
        values (zeros where rows are padded): learn it once by preparing a copy whose values
        are their own indices, then each refresh is one ``np.take``. False: too many values to
        index exactly in float32 (2^24), the caller re-derives the row."""
        perms = self.__dict__.setdefault("_f32_perm", {})
        perm = perms.get(p.name)
        lays = [m.layout for m in p.modules]
        if perm is None:
            from sparsemerge.kernels.layout import BlockedNM
            from sparsemerge.runtime.kernels import decode_kernel

            total = sum(x.values.numel() for x in lays)
            if total + 1 >= 2 ** 24:
                return False
            ids, start = [], 1  # 0: the padding's zero
            for x in lays:
                n = x.values.numel()
                ids.append(BlockedNM(x.rows, x.cols, x.n, x.m, x.codec,
                                     torch.arange(start, start + n, dtype=torch.float32).reshape(x.values.shape),
                                     x.meta, x.index, x.scale, x.zero, x.group_size))
                start += n
            fake = ids[0] if len(ids) == 1 else concat_rows(ids)
            vals = decode_kernel(p.kernel, fake).prepare(fake)["vals"]
            perm = perms[p.name] = vals.astype(np.int32)  # 4 bytes per value, kept for the next refresh
            if perm.shape != self._kw_lists["f32_vals"][idx].shape:
                return False
        src = np.concatenate([np.zeros(1, np.float32)] + [x.values.contiguous().numpy().reshape(-1) for x in lays])
        np.take(src, perm, out=self._kw_lists["f32_vals"][idx])
        return True

    def _add_general(self, layout, kw) -> int:
        """A general N:M layer (KIND_BG): its values go to the typed list of their dtype, the
        other three lists get a one-element placeholder so one index addresses them all."""
        from sparsemerge.kernels.cpu_general import BF16, F16, F32, Q4, Q8

        if layout.codec == "int4":
            vkind, values = Q4, layout.values.numpy()
        elif layout.codec == "int8":
            vkind, values = Q8, layout.values.numpy()
        elif layout.values.dtype == torch.float32:
            vkind, values = F32, layout.values.numpy()
        else:  # float16 / bfloat16 bits, widened as they are read
            vkind = BF16 if layout.values.dtype == torch.bfloat16 else F16
            values = layout.values.contiguous().view(torch.int16).numpy().view(np.uint16)
        which = S.BG_LISTS.index(str(values.dtype))
        for i, name in enumerate(S.BG_LISTS):
            kw[f"bg_{name}"].append(np.ascontiguousarray(values) if i == which else np.zeros((1, 1, 1, 1), name))
        kw["bg_index"].append(np.ascontiguousarray(layout.index.numpy()))
        dummy = np.zeros((1, 1, 1), np.float32)
        scale = dummy if layout.scale is None else layout.scale.float().contiguous().numpy()
        kw["bg_scale"].append(scale)
        kw["bg_zero"].append(scale if layout.zero is None else layout.zero.float().contiguous().numpy())
        self._bg_par.append((vkind, layout.n, layout.m, int(layout.zero is not None), layout.groups_per_scale, which))
        return len(self._bg_par) - 1

    def _add_bias(self, p, kw) -> int:
        biases = [getattr(m, "bias", None) for m in p.modules]
        if all(b is None for b in biases):
            return -1
        parts = [torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(p.modules, biases)]
        kw["biases"].append(np.ascontiguousarray(torch.cat(parts).numpy()))
        return len(kw["biases"]) - 1

    def _build_buffers(self) -> None:
        c = self.plan.config
        H, NH, KVH, HD, I = c["hidden"], c["heads"], c["kv_heads"], c["head_dim"], c["intermediate"]
        f = np.float32
        cols = max(self.max_cols, I, H)
        self.bufs = (
            np.zeros(H + SLACK, f),  # h: the residual stream
            np.zeros(max(H, NH * HD) + SLACK, f),  # x: normalized input / o and down outputs
            np.zeros((NH + 2 * KVH) * HD + SLACK, f),  # qkv
            np.zeros(NH * HD + SLACK, f),  # attention output
            np.zeros(2 * I + SLACK, f),  # gate / up
            np.zeros(I + SLACK, f),  # silu(g) * u
            np.full((cols // 128 + 2) * 128, 128, np.uint8),  # INT8 activations + 128
            np.ones(cols // 256 + 2, f),  # their scales per 256
            np.zeros(((self.max_rows + 63) // 64) * 64 + SLACK, f),  # kernel output scratch
            make_scratch(NH, KVH, HD, self.max_seq),  # attention: per (kv head, chunk) task
            np.zeros(I + SLACK, np.uint32),  # silu's 2^n as float bits
        )
        self.kc = np.zeros((c["layers"], KVH, self.max_seq, HD), np.uint16 if self.kv_cache == "float16" else f)
        self.vc = np.zeros_like(self.kc)
        self.logits = np.zeros(c["vocab"], f)

    def refresh_weights(self, modules: Optional[Sequence[nn.Module]] = None) -> None:
        """Bring the flat weight arrays up to date after the model's values changed in place
        (a task switch, deploy/switch.py); the plan, buffers and KV cache stay. ``modules``:
        only the products holding one of these (and the norms) are re-derived, written into
        the existing arrays (shapes depend on the pattern only); None: everything rebuilt."""
        if modules is None:
            self._build_weights()
            return
        ids = {id(m) for m in modules}
        for p in self.plan.layers:
            if any(id(m) in ids for m in p.modules):
                self._refresh_row(p)
        decoder = self.model.model
        norms = [t for layer in decoder.layers for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        norms.append(decoder.norm.weight)
        np.copyto(self.norms, torch.stack([n.detach().float() for n in norms]).numpy())

    def refresh_nbytes(self) -> int:
        """Bytes kept to make :meth:`refresh_weights` fast (the gather rows' value indices)."""
        return sum(a.nbytes for a in self.__dict__.get("_f32_perm", {}).values())

    def _refresh_row(self, p) -> None:
        """Re-derive plan row ``p``'s arrays (as at construction) into the arrays in use."""
        from collections import defaultdict

        idx = self._row_index[p.name]
        if p.kind in (S.KIND_BQ, S.KIND_BF, S.KIND_BH, S.KIND_BG) and self._refresh_concat(p, idx):
            return
        if p.kind == S.KIND_F32 and self._refresh_f32(p, idx):
            return
        fresh: dict = defaultdict(list)
        saved, self._bg_par = self._bg_par, []
        try:
            self._add_op(p, fresh, [], [], [], [], [])
        finally:
            self._bg_par = saved
        for name, arrays in fresh.items():
            if name == "biases" or not arrays:
                continue
            at = int(self.kw[7][idx, 3]) if name in ("bq_codes4", "bq_codes8") else idx  # BQ codes: own list index
            target = self._kw_lists[name][at]
            if not np.shares_memory(target, arrays[0]):
                np.copyto(target, arrays[0])

    def _time_step_parts(self, parts: int, repeats: int) -> float:
        """Median seconds of ``step.decode_step_parts`` running only ``parts`` on the step's
        buffers; the cache slot it may write is restored afterwards."""
        slot = min(self.pos, self.max_seq - 1)
        saved_k, saved_v = self.kc[:, :, slot].copy(), self.vc[:, :, slot].copy()
        args = (0, slot) + self._step_args() + (parts,)
        step = self._compiled(S.decode_step_parts, args)
        times = []
        try:
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                step(*args)
                times.append(time.perf_counter() - t0)
        finally:
            self.kc[:, :, slot], self.vc[:, :, slot] = saved_k, saved_v
        return float(np.median(times[1:]))

    def time_elementwise(self, repeats: int = 20) -> float:
        """Median seconds of one step's element-wise rest alone - the embedding row, RMSNorm
        and the INT8 quantization of activations, RoPE, the KV cache write, SwiGLU and the
        residuals (``step.decode_step_parts`` with only PART_ELEMENTWISE) - on the step's
        buffers. The cache slot it writes is restored afterwards."""
        return self._time_step_parts(S.PART_ELEMENTWISE, repeats)

    def time_dispatch(self, repeats: int = 20) -> float:
        """Median seconds of a step that runs none of its parts: calling the compiled step
        from Python (through its resolved entry point, as :meth:`step` does: unboxing its
        arguments) and walking the layers and the op table - the step's own cost beyond its
        work."""
        return self._time_step_parts(0, repeats)

    def breakdown(self, result: GenerationResult, repeats: int = 20) -> dict[str, float]:
        """Where a decoded token of ``result`` (the last generation of this engine) went, in
        seconds, each part timed alone on the step's buffers: ``products``
        (:meth:`time_products`), ``attention`` (:meth:`time_attention` at the middle decoded
        position), ``elementwise`` (:meth:`time_elementwise`) - the work - and the runtime's
        own overhead: ``dispatch`` (:meth:`time_dispatch`) and ``python`` (the token's time
        beyond its step in ``result``: sampling, stop checks, the loop); ``overhead`` is their
        sum. ``unattributed``: the step's time less its four parts, signed - how well the
        parts timed alone add up to the step (timing noise, and products that run faster or
        slower back to back than between the other parts)."""
        steps = len(result.step_seconds)
        if steps < 1:
            raise SparsemergeError("breakdown needs a generation of at least 2 tokens")
        token = result.decode_seconds / steps
        step = float(np.mean(result.step_seconds))
        products = self.time_products(repeats)
        attention = self.time_attention(repeats, pos=max(0, self.pos - 1 - steps // 2))
        elementwise = self.time_elementwise(repeats)
        dispatch = self.time_dispatch(repeats)
        python = max(0.0, token - step)
        return {"token": token, "step": step, "products": products, "attention": attention, "elementwise": elementwise,
                "dispatch": dispatch, "python": python, "overhead": dispatch + python,
                "unattributed": step - products - attention - elementwise - dispatch}

    # ------------------------------------------------------------------ running
    def _step_args(self) -> tuple:
        """The step's arguments after the token and the position."""
        return (self.cfg, self.eps, self.scaling, self.ops, self.head_op, self.a8_in, self.norms, self.emb, self.kc,
                self.vc, self.cos, self.sin, self.bufs, self.kw, self.logits)

    def _compiled(self, fn, args: tuple):
        """The compiled entry point of the jitted ``fn`` for ``args``, resolved once for the
        objects after the token and the position. Numba's dispatcher types every argument on
        every call - for the step's ~50 arrays in nested tuples that took 0.3 ms against the
        entry point's 0.02 ms (Zen 5, under load), a tenth of a token. A new object among the
        arguments (a rebuilt tuple, a swapped array) resolves it again."""
        fixed = args[2:]
        hit = self._entries.get(fn)
        if hit is not None and len(hit[0]) == len(fixed) and all(a is b for a, b in zip(hit[0], fixed)):
            return hit[1]
        sig = tuple(fn.typeof_pyval(a) for a in args)
        fn.compile(sig)  # loads the cached machine code where there is one
        entry = fn.overloads.get(sig)
        entry = fn if entry is None else entry.entry_point  # no exact match: the dispatcher types each call
        self._entries[fn] = (fixed, entry)
        return entry

    def reset(self) -> None:
        self.pos = 0

    def step(self, token: int) -> np.ndarray:
        """Run one token at the current position; returns the logits (a view, overwritten by
        the next call) and advances the position."""
        if self.pos >= self.max_seq:
            raise SparsemergeError(f"the sequence reached max_seq={self.max_seq}; create the engine with a larger max_seq")
        if not 0 <= token < self.plan.config["vocab"]:
            raise SparsemergeError(f"token id {token} is outside the vocabulary (0..{self.plan.config['vocab'] - 1})")
        args = (token, self.pos) + self._step_args()
        ok = self._compiled(S.decode_step, args)(*args)
        if not ok:  # an activation was NaN/Inf: INT8 cannot carry it; a float model gives NaN logits
            self.logits[:] = np.nan
        self.pos += 1
        return self.logits

    def time_products(self, repeats: int = 20) -> float:
        """Median seconds of the products of one step alone (the kernels), run on the buffers
        of the last step - the rest of a token's time is the runtime's own."""
        sink = np.zeros(max(self.plan.config["vocab"], self.max_rows) + SLACK, np.float32)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            S.products_only(self.cfg, self.ops, self.head_op, self.bufs, self.kw, sink)
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    def time_ops(self, repeats: int = 10, flush_bytes: int = 96 << 20) -> list[dict]:
        """Each product of a step timed alone (the plan's rows, the head included): the best of
        ``repeats`` calls, each after reading ``flush_bytes`` so its weights stream from DRAM
        as in decoding (0: from the cache), less the cost of calling ``run_op`` from Python
        (an empty op timed the same way). ``[{"name", "kernel", "rows", "cols", "bytes",
        "seconds"}]`` in plan order; their sum is close to :meth:`time_products`."""
        c = self.plan.config
        h_buf, x_buf, qkv, att, gu, act, xu, xs, tmp, attn, bits = self.bufs
        sink = np.zeros(max(c["vocab"], self.max_rows) + SLACK, np.float32)
        hidden, heads, inter = x_buf[: c["hidden"]], att[: c["heads"] * c["head_dim"]], act[: c["intermediate"]]
        input_of_slot = {0: hidden, 1: hidden, 2: hidden, 3: heads, 4: hidden, 5: hidden, 6: inter}
        slot_of = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "o_proj": 3, "gate_proj": 4, "up_proj": 5, "down_proj": 6}
        flush = np.ones(max(1, flush_bytes // 4), np.float32)
        threads = int(self.cfg[S.C_THREADS])

        def best(op, x, fn=S.run_op) -> float:
            fn(op, x, xu, xs, sink, tmp, threads, self.kw)  # warm (dispatch, page faults)
            times = []
            for _ in range(max(1, repeats)):
                if flush_bytes:
                    float(flush.sum())
                t0 = time.perf_counter()
                fn(op, x, xu, xs, sink, tmp, threads, self.kw)
                times.append(time.perf_counter() - t0)
            return min(times)

        call = best(self.head_op, hidden, S.run_nothing)
        out = []
        for p in self.plan.layers:
            if p.name == "lm_head":
                op, x = self.head_op, hidden
            else:
                parts = p.name.split(".")
                slot = slot_of[parts[-1].split("+")[0]]
                op, x = self.ops[int(parts[2]), slot], input_of_slot[slot]
            out.append({"name": p.name, "kernel": p.kernel, "rows": p.rows, "cols": p.cols, "bytes": p.bytes,
                        "seconds": max(0.0, best(op, x) - call)})
        return out

    def time_attention(self, repeats: int = 20, pos: Optional[int] = None) -> float:
        """Median seconds of one step's attention alone (every layer, over the cache positions
        up to ``pos``, default the last one written, on the step's buffers): the share of a
        token that grows with the context."""
        from sparsemerge.runtime.attention import PAR_MIN_POS, attend

        if self.pos < 1:
            raise SparsemergeError("time_attention needs a filled cache: run a prompt first")
        pos = self.pos - 1 if pos is None else int(pos)
        if not 0 <= pos < self.pos:
            raise SparsemergeError(f"time_attention: position {pos} is not in the cache (0..{self.pos - 1})")
        c = self.plan.config
        bufs = self.bufs
        threads = self.threads if pos >= PAR_MIN_POS else 1
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for layer in range(c["layers"]):
                attend(bufs[2], self.kc[layer], self.vc[layer], pos, c["heads"], c["kv_heads"], c["head_dim"],
                       self.scaling, c["window"], bufs[9], bufs[3], threads)
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Run the prompt through the transformers model (batched sparse kernels), keep its
        keys/values, return the last position's logits. Prompts of up to
        ``STEPPED_PREFILL_MAX`` tokens go through the compiled step instead."""
        ids = list(ids)
        if not ids:
            raise SparsemergeError("the prompt is empty: give at least one token")
        vocab = self.plan.config["vocab"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise SparsemergeError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        if self.pos + len(ids) > self.max_seq:
            raise SparsemergeError(f"prompt of {len(ids)} tokens does not fit max_seq={self.max_seq}")
        if self.pos > 0 or len(ids) <= STEPPED_PREFILL_MAX:  # continuing, or short: through the compiled step
            for t in ids:
                logits = self.step(t)
            return logits
        with torch.no_grad():
            out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        # transformers 5 names it `cache` (reading `past_key_values` prints a deprecation)
        cache = out["cache"] if "cache" in out else out.past_key_values
        T = len(ids)
        for i, layer in enumerate(cache.layers):
            self.kc[i, :, :T] = self._cache_values(layer.keys[0])
            self.vc[i, :, :T] = self._cache_values(layer.values[0])
        self.pos = T
        self.logits[:] = out.logits[0, -1].float().numpy()
        return self.logits

    def _cache_values(self, t: torch.Tensor) -> np.ndarray:
        """Keys or values of the prompt (kv_heads, T, head_dim) in the cache's dtype."""
        if self.kv_cache == "float16":  # the same rounding as the step's (to nearest even)
            return t.float().numpy().astype(np.float16).view(np.uint16)
        return t.float().numpy()

    def generate(self, prompt: "str | Sequence[int]", max_new_tokens: int = 64,
                 sampling: Optional[SamplingConfig] = None, stop: Sequence[str] = (),
                 on_token: Optional[Callable[[int, str], None]] = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` after ``prompt`` (text or token ids); stops at EOS
        or when the text contains one of ``stop`` (returned without it). ``on_token(id,
        text_piece)`` streams; the pieces join to the returned text (with stop strings, the last
        few characters are held back until they cannot begin one)."""
        steps = self._generation(prompt, max_new_tokens, sampling, stop, need_pieces=on_token is not None)
        while True:
            try:
                tok, piece = next(steps)
            except StopIteration as end:
                return end.value
            if on_token is not None:
                on_token(tok, piece)

    def stream(self, prompt, max_new_tokens: int = 64, sampling: Optional[SamplingConfig] = None,
               stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield text pieces as they are made, decoding in the caller's thread (numba's parallel
        regions are slow to launch from a second thread: see deploy.scheduler.TaskScheduler)."""
        for _tok, piece in self._generation(prompt, max_new_tokens, sampling, stop, need_pieces=True):
            yield piece

    def _generation(self, prompt, max_new_tokens: int, sampling: Optional[SamplingConfig], stop: Sequence[str],
                    need_pieces: bool) -> Generator[tuple[int, str], None, GenerationResult]:
        """The decode loop as a generator of ``(token id, text piece)``; returns the result."""
        sampling = sampling or SamplingConfig()
        if max_new_tokens < 1:
            raise SparsemergeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self._encode(prompt)
        if len(ids) + max_new_tokens > self.max_seq:
            raise SparsemergeError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed max_seq={self.max_seq}")
        eos = self._eos_ids()
        sampler = Sampler(sampling)
        self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(ids)
        t1 = time.perf_counter()
        out: list[int] = []
        text, reason = "", "length"
        steps = []
        stop = [s for s in stop if s]
        need_text = need_pieces or bool(stop)  # decoding text per token costs ~0.1 ms
        # streamed text is held back by len(longest stop) - 1 characters, so that a stop
        # string is never shown before it is recognised
        hold = max((len(s) for s in stop), default=1) - 1
        shown = 0
        for i in range(max_new_tokens):
            tok = sampler(logits)
            out.append(tok)
            if need_text:
                text += self._piece(out, text, final=tok in eos or i + 1 == max_new_tokens)
            done = tok in eos
            reason = "eos" if done else reason
            hit = next((s for s in stop if s in text), None) if stop else None
            if hit is not None:  # the text up to the stop string (which is not returned)
                text, done, reason = text[: text.index(hit)], True, "stop string"
            if need_pieces:
                safe = len(text) if done or i + 1 == max_new_tokens else max(shown, len(text) - hold)
                piece, shown = text[shown:safe], safe
                yield tok, piece
            if done:
                break
            if i + 1 < max_new_tokens:
                s0 = time.perf_counter()
                logits = self.step(tok)
                steps.append(time.perf_counter() - s0)
        if not need_text and self.tokenizer is not None:
            text = self.tokenizer.decode(out, skip_special_tokens=True)
        t2 = time.perf_counter()
        return GenerationResult(out, text, len(ids), t1 - t0, t2 - t1, reason, steps)

    # ------------------------------------------------------------------ text
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SparsemergeError("a text prompt needs a tokenizer; pass token ids or give the engine one")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(e, int):
                ids.add(e)
            elif isinstance(e, (list, tuple)):
                ids.update(int(x) for x in e)
        return ids

    def _piece(self, out: list[int], text_so_far: str, final: bool = False) -> str:
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(out, skip_special_tokens=True)
        if not final:  # a token that ends inside a UTF-8 character decodes to U+FFFD until its next bytes come
            full = full.rstrip("\ufffd")
        return full[len(text_so_far):] if full.startswith(text_so_far) else full
