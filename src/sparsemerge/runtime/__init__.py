"""Decode runtime for packed Llama-family decoders (chapter 10.2.8: static analysis of the
sparse model -> an execution plan -> fused, compiled decode steps with per-layer kernels).

``plan.build_plan(model)`` reads every projection's pattern, codec, group size and shape and
picks a kernel per layer for this CPU (``sparsemerge plan MODEL`` prints it);
``engine.DecodeEngine`` runs one decoding token as ONE compiled numba call over all layers
(preallocated buffers, a float32 KV cache, fused QKV and gate/up products, RMSNorm fused with
the activation quantization, RoPE, grouped-query attention and SwiGLU in compiled code);
the prompt goes through the transformers model's batched sparse kernels.
"""
from sparsemerge.runtime.plan import DecodePlan, LayerPlan, UnsupportedModel, build_plan
from sparsemerge.runtime.sampling import SamplingConfig

__all__ = ["DecodePlan", "LayerPlan", "UnsupportedModel", "build_plan", "SamplingConfig", "DecodeEngine"]


def __getattr__(name: str):
    # the engine pulls in numba; import it on first use
    if name == "DecodeEngine":
        from sparsemerge.runtime.engine import DecodeEngine

        return DecodeEngine
    raise AttributeError(name)
