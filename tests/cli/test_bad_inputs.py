"""Bad inputs as a careless or hostile user gives them (issue 17: "silent wrong results", "hangs",
"tracebacks instead of a clear message"), one table row each: the command, the exit code, a
fragment of the message. Every row also checks: no traceback, no hang (an alarm), and the
inputs byte-identical afterwards (a hash of every input folder before and after)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_TEXT, make_tiny_llama
from sparsemerge.cli.main import main

GATE = "model.layers.0.mlp.gate_proj.weight"
CASE_SECONDS = 120  # a hang fails the row instead of stopping the suite


@dataclass(frozen=True)
class World:
    """<root>/tiny/{base,ft0,ft1}, a 2:4 pruned copy of base, and its packed copy."""

    root: Path
    base: Path
    ft0: Path
    ft1: Path
    pruned: Path
    pk: Path
    text: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    for i, name in enumerate(("base", "ft0", "ft1")):
        make_tiny_llama(seed=i).save_pretrained(root / "tiny" / name)
        tiny_tokenizer.save_pretrained(root / "tiny" / name)
    w = World(root, root / "tiny" / "base", root / "tiny" / "ft0", root / "tiny" / "ft1", root / "pruned", root / "pk",
              root / "text.txt")
    w.text.write_text(TINY_TEXT)
    assert main(["prune", str(w.base), str(w.pruned), "--no-progress"]) == 0
    assert main(["pack", str(w.pruned), str(w.pk), "--no-progress"]) == 0
    return w


# ----------------------------------------------------------------------------- inputs made per case


def _merge_yaml(w: World, t: Path, method: str, params: str, base: bool = False) -> Path:
    path = t / "merge.yaml"
    path.write_text(
        f"merge_method: {method}\n" + (f"base_model: {w.base}\n" if base else "")
        + f"models:\n  - model: {w.ft0}\n    parameters: {{{params}}}\n"
        f"  - model: {w.ft1}\n    parameters: {{{params}}}\ndtype: float32\n"
    )
    return path


def _edit_manifest(w: World, t: Path, edit: Callable[[dict], None], reseal: bool = False) -> Path:
    """A copy of the packed model with its manifest edited; ``reseal`` recomputes the manifest
    digest, as a careful forger would, so the checks behind it are reached."""
    from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, manifest_digest

    folder = t / "pk"
    shutil.copytree(w.pk, folder)
    path = folder / "sparsemerge_packed.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if reseal:
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))
    return folder


def _drop_entry(m: dict) -> None:
    del m["tensors"][GATE]
    for names in m["shards"].values():
        if GATE in names:
            names.remove(GATE)


def dropped_entry(w: World, t: Path, mp) -> Path:
    """A tensor deleted from both tables of the manifest: unpack exited 0 without it."""
    return _edit_manifest(w, t, _drop_entry)


def edited_dtype(w: World, t: Path, mp) -> Path:
    """A tensor's dtype edited in the manifest: unpack wrote zeros."""
    return _edit_manifest(w, t, lambda m: m["tensors"][GATE].__setitem__("dtype", "int8"))


def huge_shape_resealed(w: World, t: Path, mp) -> Path:
    return _edit_manifest(w, t, lambda m: m["tensors"][GATE].__setitem__("shape", [10**12, 10**12]), reseal=True)


def nan_in_packed(w: World, t: Path, mp) -> Path:
    """A packed model holding a NaN with digests that match, as one packed before pack refused NaN."""
    from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, fields_digest, manifest_digest, record_digest

    folder = t / "pk"
    shutil.copytree(w.pk, folder)
    path = folder / "sparsemerge_packed.json"
    manifest = json.loads(path.read_text())
    name = "model.norm.weight"
    record = manifest["tensors"][name]
    shard = folder / record["shard"]
    state = load_file(shard)
    key = record["fields"]["values"]["key"]
    state[key][0] = float("nan")
    save_file(state, shard, metadata={"format": "sparsemerge-packed"})
    fields = {f: state[spec["key"]] for f, spec in record["fields"].items()}
    record["sha256"] = record_digest(name, record, fields_digest(fields))
    manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=1))
    return folder


def huge_shape(w: World, t: Path, mp) -> Path:
    """A manifest shape of [1e12, 1e12]: the entropy decoder would compute C**(2.5e11)."""
    return _edit_manifest(w, t, lambda m: m["tensors"][GATE].__setitem__("shape", [10**12, 10**12]))


def extra_entry(w: World, t: Path, mp) -> Path:
    return _edit_manifest(w, t, lambda m: m["tensors"].__setitem__("model.extra.weight", dict(m["tensors"][GATE])))


def broken_config(w: World, t: Path, mp) -> Path:
    folder = t / "pk"
    shutil.copytree(w.pk, folder)
    (folder / "config.json").write_text("{ not json")
    return folder


def wrong_config(w: World, t: Path, mp) -> Path:
    folder = t / "pk"
    shutil.copytree(w.pk, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def nan_weight(w: World, t: Path, mp) -> Path:
    """A NaN in a kept (nonzero) position of a 2:4 model."""
    folder = t / "pruned"
    shutil.copytree(w.pruned, folder)
    state = load_file(folder / "model.safetensors")
    row, col = (state[GATE] != 0).nonzero()[0].tolist()
    state[GATE][row, col] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def int32_label(w: World, t: Path, mp) -> Path:
    """float32 bytes whose safetensors header says I32 (same size, so the file stays consistent)."""
    folder = t / "base"
    shutil.copytree(w.base, folder)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    header[GATE]["dtype"] = "I32"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return folder


def malicious_bin(w: World, t: Path, mp) -> Path:
    """pytorch_model.bin whose pickle would run a command; weights_only must refuse it."""
    folder = t / "evil"
    shutil.copytree(w.base, folder)
    (folder / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {t / 'PWNED'}",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    return folder


def other_hidden_size(w: World, t: Path, mp) -> Path:
    yaml = t / "merge.yaml"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=True))
    small.save_pretrained(t / "small")
    yaml.write_text(f"merge_method: linear\nmodels:\n  - model: {w.ft0}\n    parameters: {{weight: 0.5}}\n"
                    f"  - model: {t / 'small'}\n    parameters: {{weight: 0.5}}\ndtype: float32\n")
    return yaml


def read_only_parent(w: World, t: Path, mp) -> Path:
    """A folder we may not write into (tests run as root, for whom chmod does not bite: the
    permission check itself is what is faked)."""
    target = t / "ro"
    target.mkdir()
    real = os.access
    mp.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == target and mode & os.W_OK else real(p, mode, *a, **k))
    return target


def disk_full(w: World, t: Path, mp) -> Path:
    from sparsemerge.io import writer

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder))

    mp.setattr(writer.ShardedWriter, "finish", full)
    return t


def unwritable_cache(w: World, t: Path, mp) -> Path:
    """SPARSEMERGE_CACHE below a regular file: refused before the (~20 s) dequantization."""
    (t / "not-a-folder").write_text("x")
    mp.setenv("SPARSEMERGE_CACHE", str(t / "not-a-folder" / "cache"))
    gguf = t / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


def lmc_never_evaluates(w: World, t: Path, mp) -> Path:
    import sparsemerge.merge.lmc as lmc

    def evaluated(*a, **k):
        raise AssertionError("the curve was evaluated before the plot path was checked")

    mp.setattr(lmc, "lmc_curve", evaluated)
    return t


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World, Path, Optional[Path]], list]  # (world, case folder, what setup returned)
    code: int
    fragment: str
    setup: Optional[Callable[[World, Path, object], Path]] = None


def _yaml(method: str, params: str, base: bool = False) -> Callable[[World, Path, Optional[Path]], list]:
    return lambda w, t, s: ["merge", _merge_yaml(w, t, method, params, base), t / "out", "--no-progress"]


FILTER_YAML = "weight: [{filter: 5, value: 0.3}, {value: 0.5}]"

CASES = [
    # -- silent wrong results (exit 0 before) ------------------------------------------------------------
    Case("unpack-dtype-int8", lambda w, t, s: ["unpack", w.pk, t / "out", "--dtype", "int8"], 2, "not a float dtype"),
    Case("merge-weight-nan", _yaml("linear", "weight: .nan"), 2, "'weight' must be a finite number"),
    Case("merge-weight-1e308", _yaml("linear", "weight: 1e308"), 2, "NaN or inf values from finite inputs"),
    Case("pack-nan-in-kept-position", lambda w, t, s: ["pack", s, t / "out", "--no-progress"], 2, "NaN or inf", nan_weight),
    Case("prune-float-labelled-i32", lambda w, t, s: ["prune", s, t / "out", "--no-progress"], 2, "stored as int32", int32_label),
    Case("merge-density-0", _yaml("ties", "weight: 0.5, density: 0", True), 2, "'density' must be in (0, 1]"),
    Case("merge-max-memory-nonsense", lambda w, t, s: _yaml("linear", "weight: 0.5")(w, t, s) + ["--max-memory=-2G"], 2,
         "a memory size must be positive and finite, got '-2G'"),
    Case("merge-density-negative", _yaml("ties", "weight: 0.5, density: -0.5", True), 2, "'density' must be in (0, 1]"),
    Case("merge-density-above-1", _yaml("ties", "weight: 0.5, density: 1.5", True), 2, "'density' must be in (0, 1]"),
    Case("merge-density-inf", _yaml("ties", "weight: 0.5, density: .inf", True), 2, "'density' must be a finite number"),
    Case("check-pattern-huge-m", lambda w, t, s: ["check", w.pruned, "--pattern", "1:100000000000"], 2, "fits none of the"),
    Case("check-pattern-block7", lambda w, t, s: ["check", w.pruned, "--pattern", "block7:0.5"], 2, "fits none of the"),
    Case("unpack-dropped-manifest-entry", lambda w, t, s: ["unpack", s, t / "out"], 2, "manifest was edited", dropped_entry),
    Case("unpack-edited-dtype", lambda w, t, s: ["unpack", s, t / "out"], 2, "manifest was edited", edited_dtype),
    Case("run-nan-inside-packed", lambda w, t, s: ["run", s, "--prompt", "hi", "--max-new-tokens", "2"], 2,
         "logits are NaN or infinite", nan_in_packed),
    Case("pack-group-negative", lambda w, t, s: ["pack", w.pruned, t / "out", "--group", "-5"], 2,
         "invalid pack options: --group: Input should be greater than or equal to 0 (got -5)"),
    # -- hangs (an edited manifest is caught by its digest; resealed, by the tensor's) --------------------
    Case("inspect-verify-huge-shape", lambda w, t, s: ["inspect", s, "--verify"], 2, "manifest was edited", huge_shape),
    Case("unpack-huge-shape", lambda w, t, s: ["unpack", s, t / "out"], 2, "manifest was edited", huge_shape),
    Case("run-huge-shape", lambda w, t, s: ["run", s, "--prompt", "hi", "--max-new-tokens", "2"], 2, "manifest was edited", huge_shape),
    Case("inspect-verify-huge-shape-resealed", lambda w, t, s: ["inspect", s, "--verify"], 2, "checksum mismatch", huge_shape_resealed),
    Case("run-huge-shape-resealed", lambda w, t, s: ["run", s, "--prompt", "hi", "--max-new-tokens", "2"], 2, "checksum mismatch",
         huge_shape_resealed),
    Case("plan-huge-shape", lambda w, t, s: ["inspect", "--plan", "4x400000000000", "2:4"], 0, ""),
    Case("plan-max-m-huge", lambda w, t, s: ["inspect", "--plan", "64x64", "0.5", "--max-m", "100000"], 2, "--max-m must be between"),
    Case("run-max-new-tokens-past-positions", lambda w, t, s: ["run", w.pk, "--prompt", "hi", "--max-new-tokens", "1000000000"],
         2, "max_position_embeddings"),
    # -- tracebacks instead of a clear message ------------------------------------------------------------
    Case("read-only-output", lambda w, t, s: ["pack", w.pruned, s / "out", "--no-progress"], 2, "cannot write into", read_only_parent),
    Case("disk-full", lambda w, t, s: ["unpack", w.pk, t / "out", "--no-progress"], 2, "No space left on device", disk_full),
    Case("unwritable-cache", lambda w, t, s: ["prune", s, t / "out", "--no-progress"], 2, "SPARSEMERGE_CACHE", unwritable_cache),
    Case("eval-batch-size-0", lambda w, t, s: ["eval", "ppl", w.base, "--data", w.text, "--batch-size", "0"], 2, "--batch-size must be >= 1"),
    Case("eval-max-windows-0", lambda w, t, s: ["eval", "ppl", w.base, "--data", w.text, "--max-windows", "0"], 2, "--max-windows must be >= 1"),
    Case("run-empty-prompt", lambda w, t, s: ["run", w.pk, "--prompt", ""], 2, "the prompt is empty"),
    Case("run-max-new-tokens-0", lambda w, t, s: ["run", w.pk, "--prompt", "hi", "--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1"),
    Case("run-max-new-tokens-negative", lambda w, t, s: ["run", w.pk, "--prompt", "hi", "--max-new-tokens", "-1"], 2, "--max-new-tokens must be >= 1"),
    Case("pack-include-bad-regex", lambda w, t, s: ["pack", w.pruned, t / "out", "--include", "("], 2, "bad include regex"),
    Case("check-include-bad-regex", lambda w, t, s: ["check", w.pruned, "--include", "("], 2, "bad include regex"),
    Case("prune-include-bad-regex", lambda w, t, s: ["prune", w.base, t / "out", "--include", "("], 2, "bad include regex"),
    Case("merge-keep-pattern-5-4", lambda w, t, s: ["merge", _merge_yaml(w, t, "linear", "weight: 0.5"), t / "out", "--keep-pattern", "5:4"],
         2, "--keep-pattern"),
    Case("merge-lora-rank-negative", lambda w, t, s: ["merge", _merge_yaml(w, t, "linear", "weight: 0.5", True), t / "out", "--lora-rank", "-1"],
         2, "--lora-rank) must be a whole number >= 1"),
    Case("merge-yaml-weight-heavy", _yaml("linear", "weight: heavy"), 2, "'weight' must be a number, got 'heavy'"),
    Case("merge-yaml-density-nan", _yaml("ties", "weight: 0.5, density: .nan", True), 2, "'density' must be a finite number"),
    Case("merge-yaml-filter-5", _yaml("linear", FILTER_YAML), 2, "filter must be a substring"),
    Case("merge-hidden-size-mismatch", lambda w, t, s: ["merge", s, t / "out", "--no-progress"], 2, "different sizes", other_hidden_size),
    Case("check-malicious-bin", lambda w, t, s: ["check", s], 2, "weights-only", malicious_bin),
    Case("unpack-broken-config", lambda w, t, s: ["unpack", s, t / "out"], 2, "config.json' is not valid JSON", broken_config),
    Case("unpack-extra-manifest-entry", lambda w, t, s: ["unpack", s, t / "out"], 2, "manifest was edited", extra_entry),
    Case("run-config-does-not-match", lambda w, t, s: ["run", s, "--prompt", "hi", "--max-new-tokens", "2"], 2,
         "does not match its weights", wrong_config),
    Case("lmc-plot-extension-first", lambda w, t, s: ["lmc", w.ft0, w.ft1, "--data", w.text, "--out", t / "curve.xyz"], 2,
         "plot format 'xyz'", lmc_never_evaluates),
    Case("prune-nsamples-huge", lambda w, t, s: ["prune", w.base, t / "out", "--method", "wanda", "--nsamples", "1000000000",
                                                 "--calib", w.text, "--seqlen", "16", "--no-progress"], 2, "calibration tokens is more than"),
    Case("lmc-grid-huge", lambda w, t, s: ["lmc", w.ft0, w.ft1, "--data", w.text, "--grid", "1000000000"], 2,
         "less than or equal to 1001"),
    Case("lmc-max-windows-0", lambda w, t, s: ["lmc", w.ft0, w.ft1, "--data", w.text, "--max-windows", "0"], 2,
         "invalid lmc options: --max-windows: Input should be greater than or equal to 1 (got 0)"),
    Case("run-unpruned-tells-cli-flag", lambda w, t, s: ["run", w.base, "--prompt", "hi", "--max-new-tokens", "2"], 2,
         "--prune on the command line"),
]


def _digest(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        if not folder.exists():
            continue
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"no answer within {CASE_SECONDS} s")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path, monkeypatch, capsys):
    made = case.setup(world, tmp_path, monkeypatch) if case.setup else None
    argv = [str(a) for a in case.argv(world, tmp_path, made)]
    before = _digest(world.root, tmp_path)
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    assert code == case.code, (argv, out[-2000:], err[-2000:])
    assert "Traceback" not in err
    if case.code == 2:
        message = err[err.find("error: "):] if "error: " in err else ""  # after any progress bar
        assert message.startswith("error: ") and case.fragment in message, err
    else:
        assert case.fragment in out
    after = _digest(world.root, tmp_path)
    assert after == before, "an input changed or was deleted"
    leftovers = [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name == "out"]
    assert not leftovers and not (tmp_path / "PWNED").exists()


def test_plan_lists_only_the_nm_that_fit_and_fails_before_printing(capsys):
    """--max-m 12 at 0.5 on 64 columns: 3:6, 5:10 and 6:12 do not divide 64; the plan names them and
    goes on (it used to stop half way); a pattern that does not fit fails before any output."""
    assert main(["inspect", "--plan", "64x64", "0.5", "--max-m", "12"]) == 0
    out = capsys.readouterr().out
    assert "no size plan for 3:6, 5:10, 6:12: 64 columns are not divisible by M" in out
    assert "64x64 at 6:12" not in out and "64x64 at 4:8" in out and "64x64 at 1:2" in out
    assert main(["inspect", "--plan", "64x62", "0.5", "2:4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "divisible by 4" in err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(world, tmp_path, umask):
    """Outputs get the mode mkdir/open would give (0777/0666 minus the umask), not tempfile's
    private 0700/0600 - a shared model folder must be readable by the group when the umask says so."""
    old = os.umask(umask)
    try:
        assert main(["pack", str(world.pruned), str(tmp_path / "pk"), "--no-progress"]) == 0
        assert main(["unpack", str(tmp_path / "pk"), str(tmp_path / "hf"), "--no-progress"]) == 0
    finally:
        os.umask(old)
    for folder in (tmp_path / "pk", tmp_path / "hf"):
        assert _mode(folder) == 0o777 & ~umask
        written = [f for f in folder.iterdir() if f.suffix == ".safetensors" or f.name == "sparsemerge_packed.json"]
        assert len(written) >= 1  # copied side files keep their source's mode, as cp -p does
        for f in written:
            assert _mode(f) == 0o666 & ~umask, f


SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sparsemerge.io import writer

    ready = Path(sys.argv[3])
    finish = writer.ShardedWriter.finish

    def slow_finish(self, *a, **k):  # mid-write: shards written, the output not renamed yet
        result = finish(self, *a, **k)
        ready.write_text("writing")
        time.sleep(120)
        return result

    writer.ShardedWriter.finish = slow_finish
    from sparsemerge.cli.main import main
    sys.exit(main(["pack", sys.argv[1], sys.argv[2], "--no-progress"]))
    """
)


def test_sigterm_mid_write_removes_the_temporary(world, tmp_path):
    out = tmp_path / "packed"
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(world.pruned), str(out), str(ready)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ready.exists():
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the child never reached the write"
            time.sleep(0.1)
        temps = [p.name for p in tmp_path.iterdir() if p.name.startswith(".packed.tmp-")]
        assert temps, "the write should be under way in a temporary folder"
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "terminated; no output was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]  # no .packed.tmp-*, no packed
