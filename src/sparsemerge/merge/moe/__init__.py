"""Mixture of experts assembled from task models (chapter 10.3.8), mergekit-moe compatible.

* :func:`build_moe(config, out)` -- read mergekit-moe's YAML (or a mapping / :class:`MoEConfig`)
  and write a Mixtral or Qwen2-MoE Hugging Face folder: the base's attention, norms and
  embeddings, each expert's MLPs from its task model, routers from the prompts.
* :func:`gate_vectors` -- the router rows for a gate mode (:mod:`.gates`).
* :func:`route_texts` / :func:`format_routing` -- which experts each text's tokens go to.
* :func:`sparse_experts_` -- run a loaded MoE's N:M experts on the project's kernels.
"""
from sparsemerge.merge.moe.build import MOE_RECORD, MoEReport, build_moe, expert_names
from sparsemerge.merge.moe.config import GATE_MODES, Expert, MoEConfig, load_moe_config
from sparsemerge.merge.moe.gates import gate_vectors
from sparsemerge.merge.moe.route import RoutingReport, expert_labels, format_routing, route_texts
from sparsemerge.merge.moe.sparse import SparseExperts, sparse_experts_

__all__ = [
    "GATE_MODES",
    "MOE_RECORD",
    "Expert",
    "MoEConfig",
    "MoEReport",
    "RoutingReport",
    "SparseExperts",
    "build_moe",
    "expert_labels",
    "expert_names",
    "format_routing",
    "gate_vectors",
    "load_moe_config",
    "route_texts",
    "sparse_experts_",
]
