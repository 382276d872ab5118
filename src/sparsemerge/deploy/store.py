"""The task store (chapter 10.3.4, 10.3.9: one sparse base on the device, a small compressed
task vector per task): one folder::

    STORE/
      store.json                the index (below), rewritten atomically on every change
      base/                     a packed model of ours (any format; ``sparsemerge pack``)
      tasks/NAME/v1/            the first version of task NAME
        entry.json              metadata + sha256 of every file (below)
        tau/                    a packed folder of tau (:mod:`.vectors`), or
        adapter/                a PEFT LoRA adapter (adapter_config.json + weights)
      tasks/NAME/v2/            a later version: tau stored as a delta against v1's tau

Versions form a hash chain: ``entry.json`` of v(k) records the sha256 of v(k-1)'s
``entry.json`` and the sha256 of the reconstructed ``tau_k = tau_(k-1) + delta_k``
(:func:`.vectors.tensors_digest`), so :meth:`TaskStore.verify` checks every file, every
link and every reconstruction from v1 on. The delta is taken against the *reconstructed*
previous version (closed loop), so quantization errors do not add up along a chain.
A LoRA version stores its adapter whole (low-rank factors do not subtract), chained the same way.

``store.json``::

    {"layout": "sparsemerge-task-store", "version": 1,
     "base": {"dir": "base", "sha256": digest of its files, "files": {rel: sha256}, "nbytes": int,
              "nm": {tensor: [n, m]}, "shapes": {tensor: [..]}},
     "tasks": {NAME: {"kind": "vector"|"lora",
                      "versions": [{"version": 1, "dir": "tasks/NAME/v1", "entry_sha256": str, "nbytes": int}]}}}
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sparsemerge.deploy import vectors as V
from sparsemerge.errors import SparsemergeError
from sparsemerge.io.atomic import atomic_output, write_json_atomic
from sparsemerge.io.checksum import sha256_file

INDEX, ENTRY = "store.json", "entry.json"
STORE_LAYOUT, ENTRY_LAYOUT, STORE_VERSION = "sparsemerge-task-store", "sparsemerge-task-entry", 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_task_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in ("base",):
        raise SparsemergeError(f"task name {name!r} is not usable: use 1-64 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit ('base' is reserved)")
    return name


def files_sha256(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (sorted)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def digest_of(files: dict[str, str]) -> str:
    import hashlib

    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]}\n".encode())
    return h.hexdigest()


class TaskStore:
    """An open task store (see module docstring). ``TaskStore.init`` creates one."""

    def __init__(self, path: "str | Path") -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise SparsemergeError(f"{str(self.path)!r} is not a task store ({INDEX} missing); create one with "
                                   "'sparsemerge store init STORE --base PACKED'")
        try:
            self.index: dict[str, Any] = json.loads(index.read_text())
        except ValueError as exc:
            raise SparsemergeError(f"{str(index)!r} is not valid JSON ({exc}); the store index is corrupt") from None
        if self.index.get("layout") != STORE_LAYOUT or self.index.get("version") != STORE_VERSION:
            raise SparsemergeError(f"{str(index)!r} is not a {STORE_LAYOUT} index of version {STORE_VERSION}")

    # ------------------------------------------------------------------ creation
    @classmethod
    def init(cls, path: "str | Path", base: "str | Path", overwrite: bool = False) -> "TaskStore":
        """Create a store at ``path`` holding a copy of the packed model ``base`` (every
        tensor is read and its checksum verified first)."""
        from sparsemerge.formats.model import read_packed
        from sparsemerge.formats.nm import NMPacked

        base = Path(base)
        nm: dict[str, list[int]] = {}
        shapes: dict[str, list[int]] = {}
        with read_packed(base) as ckpt:  # raises on a folder that is not a packed model
            for name in ckpt.names():
                obj = ckpt.get_format(name, verify=True)
                shapes[name] = [int(s) for s in obj.shape]
                if isinstance(obj, NMPacked):
                    nm[name] = [obj.n, obj.m]
        if not (base / "config.json").is_file():
            raise SparsemergeError(f"base {str(base)!r} has no config.json; pack it from a Hugging Face folder")
        with atomic_output(path, overwrite=overwrite, inputs=[base]) as tmp:
            shutil.copytree(base, tmp / "base", symlinks=False)
            (tmp / "tasks").mkdir()
            files = files_sha256(tmp / "base")
            index = {"layout": STORE_LAYOUT, "version": STORE_VERSION,
                     "base": {"dir": "base", "sha256": digest_of(files), "files": files,
                              "nbytes": sum((tmp / "base" / f).stat().st_size for f in files), "nm": nm, "shapes": shapes},
                     "tasks": {}}
            (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        return cls(path)

    # ------------------------------------------------------------------ reading
    @property
    def base_dir(self) -> Path:
        return self.path / self.index["base"]["dir"]

    @property
    def base_nbytes(self) -> int:
        return int(self.index["base"]["nbytes"])

    def tasks(self) -> list[str]:
        return sorted(self.index["tasks"])

    def _task(self, name: str) -> dict[str, Any]:
        try:
            return self.index["tasks"][name]
        except KeyError:
            known = ", ".join(self.tasks()) or "none"
            raise SparsemergeError(f"unknown task {name!r} in store {str(self.path)!r}; known tasks: {known}") from None

    def kind(self, name: str) -> str:
        return self._task(name)["kind"]

    def versions(self, name: str) -> list[int]:
        return [int(v["version"]) for v in self._task(name)["versions"]]

    def _version(self, name: str, version: Optional[int]) -> dict[str, Any]:
        rows = self._task(name)["versions"]
        if version is None:
            return rows[-1]
        for row in rows:
            if row["version"] == version:
                return row
        have = ", ".join("v%d" % r["version"] for r in rows)
        raise SparsemergeError(f"task {name!r} has no version {version}; it has {have}")

    def entry(self, name: str, version: Optional[int] = None) -> dict[str, Any]:
        row = self._version(name, version)
        path = self.path / row["dir"] / ENTRY
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SparsemergeError(f"task {name!r} v{row['version']}: {ENTRY} is unreadable ({exc}); the entry is corrupt") from None

    def task_vector(self, name: str, version: Optional[int] = None, verify: bool = True) -> dict[str, torch.Tensor]:
        """The reconstructed ``tau`` of a vector task (float32, each tensor in its space -
        :meth:`spaces`): v1 decoded, plus every later delta up to ``version`` (default: latest)."""
        if self.kind(name) != "vector":
            raise SparsemergeError(f"task {name!r} is a {self.kind(name)} task, not a stored task vector")
        upto = self._version(name, version)["version"]
        tau: dict[str, torch.Tensor] = {}
        for row in self._task(name)["versions"]:
            if row["version"] > upto:
                break
            folder = self.path / row["dir"]
            if verify:
                self._check_entry_files(name, row)
            tau = V.add_into(tau, V.read_tensors(folder / "tau", verify=verify))
            if verify:
                recorded = self.entry(name, row["version"]).get("tau_sha256")
                if V.tensors_digest(tau) != recorded:
                    raise SparsemergeError(f"task {name!r} v{row['version']}: the reconstructed task vector does not match "
                                           "its recorded sha256; the chain is corrupt")
        return tau

    def spaces(self, name: str, version: Optional[int] = None) -> dict[str, str]:
        """``{tensor: "slots" | "dense"}`` of a vector task (the union over its chain)."""
        out: dict[str, str] = {}
        upto = self._version(name, version)["version"]
        for v in self.versions(name):
            if v <= upto:
                out.update(self.entry(name, v).get("spaces", {}))
        return out

    def lora_folder(self, name: str, version: Optional[int] = None, verify: bool = True) -> Path:
        if self.kind(name) != "lora":
            raise SparsemergeError(f"task {name!r} is a {self.kind(name)} task, not a LoRA adapter")
        row = self._version(name, version)
        if verify:
            self._check_entry_files(name, row)
        return self.path / row["dir"] / "adapter"

    # ------------------------------------------------------------------ adding
    def add(self, name: str, source: "str | Path", *, select: Optional[str] = None, density: Optional[float] = None,
            quant: str = "int8", group_size: int = 128, new_version: bool = False,
            finetuned_from: "str | Path | None" = None) -> dict[str, Any]:
        """Add task ``name`` from ``source``: a fine-tuned model (HF folder / safetensors / packed
        folder; ``tau = source - base``) or a PEFT LoRA adapter folder. ``new_version``: ``name``
        exists and this becomes its next version (a delta against the reconstructed latest).
        ``select``: "nm" (aligned to the base's N:M slots; default when the base has N:M
        tensors) or "topk"; ``density``: share of tau kept per tensor (default 0.1; for a later
        version its first version's). ``quant``/``group_size`` of the stored values.
        ``finetuned_from``: the model ``source`` was fine-tuned from when that is not the base
        (the dense model the base was pruned from): ``tau = source - finetuned_from``, so the
        pruning's own changes (pruned weights, SparseGPT's updates of kept ones) are not taken
        for the task."""
        from sparsemerge.merge.lora import is_lora_adapter

        check_task_name(name)
        exists = name in self.index["tasks"]
        if exists and not new_version:
            raise SparsemergeError(f"task {name!r} already exists (v{self.versions(name)[-1]}); pass --new-version "
                                   "(new_version=True) to store this as its next version, or choose another name")
        if new_version and not exists:
            raise SparsemergeError(f"task {name!r} does not exist yet; add it without --new-version first")
        source = Path(source)
        if not source.exists():
            raise SparsemergeError(f"task source {str(source)!r} does not exist")
        origin = None if finetuned_from is None else Path(finetuned_from)
        if origin is not None and not origin.exists():
            raise SparsemergeError(f"--finetuned-from {str(origin)!r} does not exist")
        lora = is_lora_adapter(source)
        if lora and origin is not None:
            raise SparsemergeError("a LoRA adapter is its own task vector; drop --finetuned-from")
        kind = "lora" if lora else "vector"
        if exists and self.kind(name) != kind:
            raise SparsemergeError(f"task {name!r} is a {self.kind(name)} task; a new version must be one too, got a {kind}")
        version = self.versions(name)[-1] + 1 if exists else 1
        parent = None
        if exists:
            prev = self._version(name, None)
            parent = {"version": prev["version"], "entry_sha256": prev["entry_sha256"]}
        rel = f"tasks/{name}/v{version}"
        target = self.path / rel
        entry: dict[str, Any] = {"layout": ENTRY_LAYOUT, "version": STORE_VERSION, "task": name, "task_version": version,
                                 "base_sha256": self.index["base"]["sha256"], "parent": parent, "source": str(source),
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        target.parent.mkdir(parents=True, exist_ok=True)
        # a folder left by an interrupted add (never indexed) is replaced
        with atomic_output(target, overwrite=target.exists(), inputs=[source, self.base_dir]) as tmp:
            if lora:
                entry.update(self._write_lora(source, tmp / "adapter"))
                entry["kind"] = "lora"
            else:
                if exists:
                    first = self.entry(name, 1)
                    select, quant, group_size = first["select"], first["quant"], first["group_size"]
                    density = first["density"] if density is None else density
                density = 0.1 if density is None else density
                select = select or ("nm" if self.index["base"]["nm"] else "topk")
                V.check_options(select, density, quant, group_size)
                entry.update(self._write_vector(name, source, tmp / "tau", select, density, quant, group_size, exists, origin))
                entry["finetuned_from"] = None if origin is None else str(origin)
            entry["files"] = files_sha256(tmp)
            entry["nbytes"] = sum((tmp / f).stat().st_size for f in entry["files"])
            (tmp / ENTRY).write_text(json.dumps(entry, indent=1) + "\n")
        row = {"version": version, "dir": rel, "entry_sha256": sha256_file(target / ENTRY),
               "nbytes": entry["nbytes"] + (target / ENTRY).stat().st_size}
        tasks = self.index["tasks"]
        tasks.setdefault(name, {"kind": kind, "versions": []})["versions"].append(row)
        self._save_index()
        return entry

    def _write_vector(self, name: str, source: Path, out: Path, select: str, density: float, quant: str,
                      group_size: int, is_delta: bool, origin: Optional[Path]) -> dict[str, Any]:
        base = self.index["base"]
        tau, spaces, kept_parts, full_parts = V.task_vector_from(self.base_dir, source, select, set(base["nm"]),
                                                                 base["shapes"], origin)
        if is_delta:
            tau = V.subtract(tau, self.task_vector(name))
        sparse = V.nonzero_only({k: V.top_k(v, density) for k, v in tau.items()})
        before = self.spaces(name) if is_delta else {}
        spaces = {k: spaces.get(k, before.get(k, V.DENSE)) for k in sparse}
        out.parent.mkdir(parents=True, exist_ok=True)
        # the task equals the base (or the previous version): a packed folder with one placeholder
        V.pack_tensors(sparse or {V.EMPTY: torch.zeros(1)}, out, quant, group_size)
        stored = V.read_tensors(out)
        recon = V.add_into(self.task_vector(name), stored) if is_delta else stored
        share = V.energy_share(kept_parts, full_parts) if kept_parts else None
        return {"kind": "delta" if is_delta else "vector", "select": select, "density": density, "quant": quant,
                "group_size": group_size, "spaces": spaces, "tau_sha256": V.tensors_digest(recon),
                "on_pattern_energy": share}

    def _write_lora(self, source: Path, out: Path) -> dict[str, Any]:
        from sparsemerge.merge.lora import LoraAdapter

        adapter = LoraAdapter(source)
        shapes = self.index["base"]["shapes"]
        for tname in adapter.targets():
            if tname not in shapes:
                raise SparsemergeError(f"adapter {str(source)!r} targets {tname!r}, which the base lacks")
            got = list(adapter.delta(tname).shape)
            if got != shapes[tname]:
                raise SparsemergeError(f"adapter {str(source)!r}: the update of {tname!r} has shape {got}, the base {shapes[tname]}")
        out.mkdir(parents=True)
        for f in sorted(source.iterdir()):
            if f.is_file() and (f.name == "adapter_config.json" or f.name.startswith("adapter_model")):
                shutil.copy2(f, out / f.name)
        return {"targets": adapter.targets(), "rank": adapter.config.get("r")}

    # ------------------------------------------------------------------ removing
    def remove(self, name: str, version: Optional[int] = None) -> None:
        """Remove task ``name`` (every version), or only its latest ``version`` (an earlier
        one is the parent of the later ones and cannot go alone)."""
        task = self._task(name)
        rows = task["versions"]
        if version is not None:
            if version != rows[-1]["version"]:
                self._version(name, version)  # unknown version: its own error
                raise SparsemergeError(f"v{version} of task {name!r} is the parent of v{version + 1}: later versions are "
                                       "stored as deltas against it; remove the later versions first (or the whole task)")
            doomed = [self.path / rows[-1]["dir"]]
            rows.pop()
            if not rows:
                del self.index["tasks"][name]
        else:
            doomed = [self.path / "tasks" / name]
            del self.index["tasks"][name]
        trash = []
        for d in doomed:  # out of the way first, so the index never names a half-deleted entry
            if d.exists():
                t = d.with_name(f".{d.name}.removed-{os.getpid()}")
                os.replace(d, t)
                trash.append(t)
        self._save_index()
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)

    # ------------------------------------------------------------------ checking
    def _check_entry_files(self, name: str, row: dict[str, Any]) -> None:
        folder = self.path / row["dir"]
        where = f"task {name!r} v{row['version']}"
        if not (folder / ENTRY).is_file():
            raise SparsemergeError(f"{where}: {folder / ENTRY} is missing")
        if sha256_file(folder / ENTRY) != row["entry_sha256"]:
            raise SparsemergeError(f"{where}: {ENTRY} does not match the sha256 the store index records; the entry was changed")
        entry = self.entry(name, row["version"])
        recorded = entry.get("files", {})
        actual = {k: v for k, v in files_sha256(folder).items() if k != ENTRY}
        for rel in sorted(set(recorded) | set(actual)):
            if rel not in actual:
                raise SparsemergeError(f"{where}: file {rel} is missing")
            if rel not in recorded:
                raise SparsemergeError(f"{where}: file {rel} is not part of the entry")
            if actual[rel] != recorded[rel]:
                raise SparsemergeError(f"{where}: file {rel} is corrupt (sha256 {actual[rel][:12]}..., recorded {recorded[rel][:12]}...)")
        if entry.get("base_sha256") != self.index["base"]["sha256"]:
            raise SparsemergeError(f"{where}: it was made against another base (base sha256 differs)")

    def verify(self, name: Optional[str] = None) -> list[str]:
        """Check the base's files and every task's chain end to end (files, links, and for
        vector tasks the reconstruction of each version); returns the problems found (empty:
        all good). ``name``: one task only."""
        problems = []
        if name is None:
            files = files_sha256(self.base_dir) if self.base_dir.is_dir() else {}
            if files != self.index["base"]["files"]:
                bad = sorted(k for k in set(files) | set(self.index["base"]["files"]) if files.get(k) != self.index["base"]["files"].get(k))
                problems.append(f"base: files missing, extra or corrupt: {', '.join(bad[:8])}")
        for task in [name] if name is not None else self.tasks():
            rows = self._task(task)["versions"]
            try:
                prev = None
                for row in rows:
                    self._check_entry_files(task, row)
                    entry = self.entry(task, row["version"])
                    link = entry.get("parent")
                    want = None if prev is None else {"version": prev["version"], "entry_sha256": prev["entry_sha256"]}
                    if link != want:
                        raise SparsemergeError(f"task {task!r} v{row['version']}: its parent link {link} does not name "
                                               f"the previous version {want}; the chain is broken")
                    prev = row
                if self.kind(task) == "vector":
                    self.task_vector(task, verify=True)  # every reconstruction against its digest
                else:
                    from sparsemerge.merge.lora import LoraAdapter

                    LoraAdapter(self.lora_folder(task, verify=False))
            except SparsemergeError as exc:
                problems.append(str(exc))
        return problems

    def list_rows(self) -> list[dict[str, Any]]:
        """One row per task version: kind, options, its bytes and the chain's, against the base."""
        rows = []
        for task in self.tasks():
            chain = 0
            for row in self._task(task)["versions"]:
                entry = self.entry(task, row["version"])
                chain += int(row["nbytes"])
                opts = ("lora r=%s" % entry.get("rank")) if entry.get("kind") == "lora" else \
                    f"{entry['select']} d={entry['density']:g} {entry['quant']}"
                rows.append({"task": task, "version": row["version"], "kind": entry.get("kind"), "options": opts,
                             "bytes": int(row["nbytes"]), "of_base": row["nbytes"] / self.base_nbytes,
                             "chain_bytes": chain, "chain_of_base": chain / self.base_nbytes})
        return rows

    def _save_index(self) -> None:
        write_json_atomic(self.path / INDEX, self.index)
