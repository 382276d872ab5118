"""``sparsemerge recover`` (recovery fine-tuning of a pruned model by distillation from its dense
original) and ``sparsemerge train`` (sparse training from a YAML recipe: gradual / progressive
N:M, SR-STE, dynamic reallocation, the three-stage recipe)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsemerge.cli.common import add_overwrite, format_table
from sparsemerge.errors import SparsemergeError, options_error


def register(sub: argparse._SubParsersAction) -> None:
    register_recover(sub)
    register_train(sub)


def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="sparse training from a YAML recipe (gradual/progressive N:M, SR-STE, dynamic masks, three stages)",
        description=(
            "Train a model to an N:M pattern in the stages RECIPE lists (methods: dense, oneshot, fixed, "
            "gradual, progressive, srste, dynamic, prune; loss: distillation from the dense model and/or "
            "cross-entropy, plus L1 and N:M regularizers). Checkpoints go to the work directory; running "
            "the same command again after an interruption resumes from the last one. OUT gets the "
            "sparse model with a pruning record, so check/pack/run treat it like a pruned model."
        ),
    )
    p.add_argument("recipe", help="recipe YAML (see examples/train_three_stage.yaml)")
    p.add_argument("out", nargs="?", help="output Hugging Face folder (default: the recipe's 'output')")
    p.add_argument("--workdir", help="checkpoints and the teacher cache (default: OUT.work beside OUT)")
    p.add_argument("--restart", action="store_true", help="ignore a checkpoint in the work directory")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the last checkpoint after success")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite(p)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from sparsemerge.io import ensure_writable, load_model, resolve_source, save_model
    from sparsemerge.prune.record import PRUNE_RECORD
    from sparsemerge.train.recipe import TRAIN_RECORD, load_recipe, prune_record, train_recipe_

    recipe = load_recipe(args.recipe)
    out = args.out or recipe.output
    if not out:
        raise SparsemergeError("no output folder: pass OUT or set 'output' in the recipe")
    inputs = [recipe.model] + ([recipe.teacher] if recipe.teacher else [])
    ensure_writable(out, args.overwrite, inputs=inputs)  # fail before any work
    workdir = Path(args.workdir) if args.workdir else Path(str(Path(out).resolve()) + ".work")
    source = resolve_source(recipe.model)
    loaded = load_model(source)
    if loaded.tokenizer is None:
        raise SparsemergeError(f"{recipe.model!r} has no tokenizer; training needs one to read the text")
    teacher = load_model(recipe.teacher).model if recipe.teacher else None
    result = train_recipe_(loaded.model, loaded.tokenizer, recipe, workdir, teacher=teacher,
                           progress=not args.no_progress, restart=args.restart)
    src = {"name": recipe.model, "path": str(Path(source.path).resolve()), "kind": source.kind, "sha256": source.checksum()}
    records = {PRUNE_RECORD: prune_record(result, recipe, src), TRAIN_RECORD: {"recipe": recipe.model_dump(), **result.to_json()}}
    save_model(loaded.model, loaded.tokenizer, out, overwrite=args.overwrite, records=records, inputs=inputs + [source.path])
    if not args.keep_checkpoint and (workdir / "checkpoint.pt").exists():
        (workdir / "checkpoint.pt").unlink()
    rows = []
    for stage in result.stages:
        data = stage.to_json()
        flips = sum(u["changed"] for u in stage.mask_updates)
        loss = f"{data['loss_first']:.3f} -> {data['loss_last']:.3f}" if stage.losses else "-"
        ppl = stage.evals[-1][1] if stage.evals else float("nan")
        rows.append((stage.name, stage.method, stage.pattern, stage.steps, loss, flips,
                     data["tokens_per_s"] if data["tokens_per_s"] is not None else "-", ppl))
    print(format_table(["stage", "method", "pattern", "steps", "loss", "mask flips", "tokens/s", "perplexity"], rows))
    if result.resumed_from is not None:
        print(f"resumed from stage {result.resumed_from[0] + 1}, step {result.resumed_from[1]}")
    for name, value in result.perplexity.items():
        print(f"perplexity {name}: {value:.3f}")
    bad = sum(layer["violations"] for layer in result.layers)
    print(f"{len(result.layers)} layers at {result.pattern} (violations: {bad}) in {result.seconds:.1f} s -> {out}")
    return 0 if bad == 0 else 1


def register_recover(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recover",
        help="recovery fine-tuning of a pruned model, distilled from the dense model",
        description=(
            "Fine-tune the pruned model PRUNED towards its dense TEACHER (knowledge distillation, "
            "T^2 KL(teacher || student) on random text windows) while its pruned weights stay zero, "
            "and write the result to OUT (a Hugging Face folder that keeps the N:M pattern). "
            "Prints the held-out perplexity of the teacher and of the student before and after."
        ),
    )
    p.add_argument("pruned", help="pruned model: HF folder (e.g. from 'sparsemerge prune'), .safetensors or .gguf")
    p.add_argument("out", help="output Hugging Face folder")
    p.add_argument("--teacher", help="dense model (HF folder, file or smollm2); default: the source recorded by 'sparsemerge prune'")
    p.add_argument("--text", default="bbc", help="training text: bbc (its calibration split), bbc:CATEGORY, FILE, folder, hf:NAME (default bbc)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per step (default 4)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, AdamW (default 5e-5)")
    p.add_argument("--temperature", type=float, default=2.0, help="distillation temperature T (default 2)")
    p.add_argument("--kd-weight", type=float, default=1.0, help="weight of the distillation term (default 1)")
    p.add_argument("--ce-weight", type=float, default=0.0,
                   help="weight of the next-token cross-entropy on the text (default 0: pure distillation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="bbc", help="held-out text for the perplexities (default bbc; 'none' skips them)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows of 512 tokens (default 8)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite(p)
    p.set_defaults(func=run_recover)


def _default_teacher(pruned: str) -> str:
    """The dense source that ``sparsemerge prune`` recorded beside ``pruned``: its absolute path
    (or, in older records, its name), and only when its weights still have the recorded SHA-256
    - run from another directory, or after the source changed, a relative name could point at a
    different model."""
    from sparsemerge.io import resolve_source
    from sparsemerge.prune.record import PRUNE_RECORD

    record = Path(pruned) / PRUNE_RECORD
    source: dict = {}
    if record.is_file():
        try:
            source = json.loads(record.read_text())["source"]
        except (ValueError, KeyError, TypeError):
            source = {}
    name = source.get("path") or source.get("name") if isinstance(source, dict) else None
    if not name:
        raise SparsemergeError(f"{pruned!r} has no 'sparsemerge prune' record naming its dense source: pass --teacher")
    expected = source.get("sha256")
    try:
        actual = resolve_source(name).checksum()
    except SparsemergeError as exc:
        raise SparsemergeError(f"the teacher recorded in {record} ({name!r}) cannot be read ({exc}); pass --teacher") from None
    if expected and actual != expected:
        raise SparsemergeError(
            f"the teacher recorded in {record} ({name!r}) no longer has the recorded weights (sha256 {actual[:12]}... "
            f"instead of {expected[:12]}...); pass --teacher with the dense model {pruned!r} was pruned from"
        )
    return str(name)


def run_recover(args: argparse.Namespace) -> int:
    from sparsemerge.eval.data import eval_windows, load_texts
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import ensure_writable, load_model, save_model
    from sparsemerge.train.recover import RECOVER_RECORD, RecoverConfig, recover_

    try:
        config = RecoverConfig(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                               temperature=args.temperature, kd_weight=args.kd_weight, ce_weight=args.ce_weight,
                               seed=args.seed, progress=not args.no_progress)
    except ValueError as exc:  # pydantic.ValidationError
        raise options_error("recovery options", exc) from None
    teacher_name = args.teacher or _default_teacher(args.pruned)
    ensure_writable(args.out, args.overwrite, inputs=[args.pruned, teacher_name])  # fail before any work
    student = load_model(args.pruned)
    teacher = load_model(teacher_name)
    if student.tokenizer is None:
        raise SparsemergeError(f"{args.pruned!r} has no tokenizer; recovery needs one to read --text")
    texts = load_texts(args.text, "calib")
    windows = None
    rows = []
    if args.eval != "none":
        windows = eval_windows(student.tokenizer, args.eval, 512, args.eval_windows)
        progress = not args.no_progress
        rows.append(("teacher (dense)", perplexity(teacher.model, windows, progress=progress, desc="teacher perplexity")))
        rows.append(("pruned, before", perplexity(student.model, windows, progress=progress, desc="student perplexity")))
    report = recover_(student.model, teacher.model, student.tokenizer, texts, config)
    record = {"config": config.model_dump(), "teacher": teacher_name, "pruned": args.pruned, "text": args.text,
              **report.to_json()}
    if windows is not None:
        rows.append(("pruned, recovered", perplexity(student.model, windows, progress=not args.no_progress, desc="recovered perplexity")))
        record["perplexity"] = {name: value for name, value in rows}
        record["eval"] = {"text": args.eval, "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
    save_model(student.model, student.tokenizer, args.out, overwrite=args.overwrite, records={RECOVER_RECORD: record},
               inputs=[args.pruned, teacher_name])
    if rows:
        base = rows[0][1]
        print(format_table(["model", "perplexity", "x teacher"], [(n, v, v / base) for n, v in rows]))
    print(f"recovered {report.masked_layers} pruned layers in {report.steps} steps ({report.tokens} tokens, "
          f"{report.seconds:.1f} s), pruned weights still zero: {report.mask_violations == 0} -> {args.out}")
    return 0
