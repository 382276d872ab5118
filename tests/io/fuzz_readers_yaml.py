"""Fuzzed YAML recipes: merge configs, MoE configs and training recipes (all read through
:mod:`sparsemerge.io.yaml_config`) and prune recipes (``sparsemerge prune --recipe``), each
followed by the accessors a command calls right after loading (model list, shard size,
training steps, run key, final pattern)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import yaml
from hypothesis import strategies as st

from fuzz_testlib import Reader, apply_byte_edits, apply_tree_edits, mutate_bytes, nasty, note, tolerate, tree_edits


def _merge(path: Any) -> None:
    from sparsemerge.merge.config import load_config

    cfg = load_config(path)
    cfg.referenced_models(), cfg.shard_bytes


def _moe(path: Any) -> None:
    from sparsemerge.merge.moe.config import load_moe_config

    cfg = load_moe_config(path)
    cfg.referenced_models(), cfg.shard_bytes, cfg.output_architecture


def _train(path: Any) -> None:
    from sparsemerge.train.recipe import _final_pattern, load_recipe

    recipe = load_recipe(path)
    recipe.training_steps(), recipe.key(), _final_pattern(recipe)
    for stage in recipe.stages:
        stage.label, stage.nm


def _prune(path: Any) -> None:
    from sparsemerge.cli.prune import config_from_args

    config_from_args(argparse.Namespace(recipe=str(path), no_progress=True))


# (name, seed, loader; takes_mapping: the loader also accepts the parsed mapping itself)
SEEDS: list[tuple[str, dict[str, Any], Callable[[Any], None], bool]] = [
    ("merge-ties", {"merge_method": "ties", "base_model": "base", "dtype": "float32", "shard_size": "2GB", "keep_pattern": "2:4",
                    "seed": 3, "parameters": {"normalize": True},
                    "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.7}},
                               {"model": "b", "parameters": {"weight": [0.1, 0.5], "density": [{"filter": "self_attn", "value": 0.5}, {"value": 0.8}]}}]},
     _merge, True),
    ("merge-passthrough", {"merge_method": "passthrough",
                           "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}]},
                                      {"sources": [{"model": "b", "layer_range": [2, 4]}], "adapter": {"ridge": 0.001, "steps": 0}}],
                           "stitch": {"data": "bbc", "nsamples": 4, "seqlen": 16}},
     _merge, True),
    ("merge-lora", {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "base+adapter"}], "lora_rank": 8,
                    "out_dtype": "bfloat16", "tokenizer_source": "base"},
     _merge, True),
    ("moe-mixtral", {"base_model": "base", "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2, "keep_pattern": "2:4",
                     "shard_size": 1000000, "experts": [{"source_model": "a", "positive_prompts": ["math"], "negative_prompts": ["poem"]},
                                                        {"source_model": "b", "positive_prompts": ["code"], "noise_scale": 0.01}]},
     _moe, True),
    ("moe-qwen", {"base_model": "base", "gate_mode": "random", "architecture": "qwen", "experts_per_token": 1, "seed": 1,
                  "experts": [{"source_model": "a"}, {"source_model": "b", "residual_scale": 0.5}],
                  "shared_experts": [{"source_model": "base"}]},
     _moe, True),
    ("train", {"model": "smollm2", "text": "bbc", "batch_size": 4, "seqlen": 128, "topk": 64, "checkpoint_every": 25,
               "exclude": ["lm_head"],
               "stages": [{"name": "pre", "method": "dense", "steps": 10, "l1": 0.001, "lr": 5e-5},
                          {"method": "progressive", "pattern": "2:4", "steps": 20, "progressive": ["dense", "4:8", "2:4"]},
                          {"method": "gradual", "pattern": "2:4", "steps": 60, "update_every": 5, "ramp_end": 0.7},
                          {"method": "prune", "pattern": "2:4", "prune": {"method": "wanda", "nsamples": 4}},
                          {"method": "fixed", "pattern": "2:4", "steps": 30}]},
     _train, False),
    ("prune", {"prune": {"pattern": "2:4", "method": "wanda", "layer_patterns": {"mlp": "4:8"}, "nsamples": 8, "exclude": ["lm_head"]}},
     _prune, False),
]
SEED_NAMES = [s[0] for s in SEEDS]
KEYS = sorted({k for _, seed, _, _ in SEEDS for k in seed} | {"model", "parameters", "sources", "layer_range", "method", "pattern"})

# ~10**8 values in 300 bytes: each level repeats the one before ten times (flow style, one line)
BOMB = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 10)}]" for a, b in zip("abcdefg", "bcdefgh")) + "}"
# YAML that PyYAML's safe loader turns into errors other than YAMLError, or into huge values
SNIPPETS = [
    "seed: 2001-02-30", "seed: 2001-02-03 25:61:00", "seed: !!timestamp 2001-13-01", "seed: !!binary '%%%'",
    "seed: !!python/object/apply:os.system ['true']", "seed: !!float abc", "seed: !!int 0xzz", "seed: 1" + "0" * 5000,
    "? [a, b]\n: c", "<<: 3", "<<: [1, 2]", "seed: *undefined", "seed: &r [*r]", "parameters: &p {w: *p}", "lr: .nan",
    "steps: .inf", "--- a\n--- b", "%YAML 9.9\n---", "\tseed: 1", "seed: 1\n  bad: indent", "\x00", "\ufeffseed: 1",
    "seed: " + "[" * 400 + "]" * 400, "seed: " + "[" * 1500 + "]" * 1500, "seed: " + "{a: " * 1500 + "1" + "}" * 1500, "seed: '\\ud800'", "seed: \"\\ud800\"",
    "1: 2", "null: x", "true: x", "[1, 2]: x", "seed:\n- " + "\n- ".join(["x"] * 50),
    "parameters: " + BOMB, "stages: [{method: prune, prune: " + BOMB + "}]", "prune: " + BOMB,
    "stages: [{method: prune, prune: &p {w: *p}}]", "exclude: &e [*e]",
]


def _dump(tree: Any) -> bytes:
    try:
        return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True).encode("utf-8", "surrogatepass")
    except (yaml.YAMLError, ValueError, TypeError, UnicodeError):
        return json.dumps(tree, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def yaml_examples(draw: Any) -> tuple[int, str, Any]:
    """(which seed, mode, payload): ``tree`` edits of the parsed seed (wrong types, NaN, huge
    numbers, dropped keys), ``bytes`` edits of its YAML text (broken indentation, invalid
    UTF-8), or a ``snippet`` of YAML that breaks loaders (bad dates, tags, deep nesting,
    recursive and exponential aliases) spliced into the text."""
    seed = draw(st.integers(0, len(SEEDS) - 1))
    mode = draw(st.sampled_from(["tree", "tree", "bytes", "snippet"]))
    if mode == "tree":
        return seed, mode, draw(tree_edits(nasty(SNIPPETS[:8] + ["2:4", "wanda", "ties", "passthrough", "base"]), keys=KEYS))
    if mode == "bytes":
        return seed, mode, draw(mutate_bytes())
    return seed, mode, (draw(st.sampled_from(SNIPPETS)), draw(st.integers(0, 64)), draw(st.booleans()))


def _read_yaml(folder: Path, example: tuple[int, str, Any]) -> None:
    index, mode, payload = example
    name, seed, loader, takes_mapping = SEEDS[index]
    text = _dump(seed)
    if mode == "tree":
        tree = apply_tree_edits(seed, payload)
        if takes_mapping and isinstance(tree, dict):
            tolerate(lambda: loader(tree))
        text = _dump(tree)
    elif mode == "bytes":
        text = apply_byte_edits(text, payload)
    else:
        snippet, line, replace = payload
        lines = text.decode("utf-8").splitlines()
        at = line % (len(lines) + 1)  # at the end: a top-level key again, which wins (PyYAML keeps the last)
        lines[at : at + int(replace)] = snippet.splitlines() or [snippet]
        text = "\n".join(lines).encode("utf-8", "surrogatepass")
    note(f"{name}: {text[:3000]!r}")
    path = folder / f"{name}.yaml"
    path.write_bytes(text)
    tolerate(lambda: loader(path))


YAML = Reader(
    "yaml", setup=lambda folder: folder, strategy=yaml_examples(), read=_read_yaml,
    doc="merge / MoE / training / prune recipes (load, then model list, shard size, run key, final pattern)",
)
