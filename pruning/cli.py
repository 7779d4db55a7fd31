"""``sparsight data synth``, ``sparsight train`` and ``sparsight evaluate``."""
from __future__ import annotations

import json
from pathlib import Path

import click

from sparsight.clitools import (OPTIONAL_RUN_DIR, device_option, profile_choice, resolve_from_cli, resolve_study,
                                study_options, usage_error)
from sparsight.layout import CHECKPOINT_FILE, Layout

from .choices import corruption_choice, method_choice, model_choice, schedule_choice


@click.group("data")
def data_group():
    """Datasets: generate the embedded concept-shapes data. Example:

    \b
      sparsight data synth data/shapes --seed 1
    """


@data_group.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path, resolve_path=True))
@click.option("--profile", type=profile_choice(), default="default", show_default=True,
              help="take image counts and size from this profile")
@click.option("--seed", type=int, default=0, show_default=True, help="same seed → identical files")
@click.option("--train-per-class", type=int, default=None, help="training images per class")
@click.option("--val-per-class", type=int, default=None, help="validation images per class")
@click.option("--image-size", type=int, default=None, help="image side in pixels")
def synth(out: Path, profile: str, seed: int, train_per_class, val_per_class, image_size):
    """Generate concept-shapes into OUT: 10 shape classes with colour, texture and background,
    ImageFolder layout (OUT/train/<class>/, OUT/val/<class>/) and per-pixel concept masks
    (OUT/masks/...), deterministic by --seed. An earlier concept-shapes dataset in OUT is replaced; any
    other content stops the command. Examples:

    \b
      sparsight data synth data/shapes
      sparsight data synth data/tiny --train-per-class 20 --val-per-class 5 --image-size 32
    """
    import shutil

    from sparsight.config import load_study

    from .data import concept_shapes

    earlier = out.is_dir() and any(out.iterdir())
    if earlier and not (out / "concepts.json").is_file():
        raise click.UsageError(f"{out} is not empty and holds no concept-shapes dataset; give a new or empty folder")
    if earlier:         # an earlier dataset: its images would mix with the new ones
        shutil.rmtree(out)
    d = load_study(profile=profile).data
    info = concept_shapes.generate(out, seed=seed, train_per_class=train_per_class or d.train_per_class,
                                   val_per_class=val_per_class or d.val_per_class,
                                   image_size=image_size or d.image_size)
    click.echo(f"wrote {info['n_train']} training and {info['n_val']} validation images "
               f"({info['image_size']} px, {len(info['classes'])} classes) with concept masks to {out}"
               f"{' (replacing the dataset there)' if earlier else ''}")


@click.command("train")
@study_options
@click.option("--data", "data_path", type=click.Path(exists=True, file_okay=False, resolve_path=True), default=None,
              help="ImageFolder root with train/ and val/ (default: the study's data)")
@click.option("--arch", type=model_choice(), default=None,
              help="model name (see `sparsight train --list-models`)")
@click.option("--weights", default=None, help="local weights file or cached torchvision weights name")
@click.option("--epochs", type=int, default=None, help="training epochs")
@click.option("--lr", type=float, default=None, help="peak learning rate")
@click.option("--batch-size", type=int, default=None, help="batch size per process")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default=None,
              help="output folder for model.pt and meta.json (default: <run_dir>/models/<model-id>)")
@click.option("--model-id", default="base", show_default=True, help="id written to meta.json")
@click.option("--no-resume", is_flag=True, help="ignore a saved train_state.pt and start over")
@click.option("--replace", is_flag=True, help="replace a model already trained in the output folder with other "
                                              "settings (without it, train stops before touching it)")
@click.option("--rewind-epoch", type=int, default=None,
              help="also save the weights at the start of this epoch as rewind.pt, for IMP "
                   "(default: prune.imp_rewind_epoch; -1: none)")
@click.option("--list-models", is_flag=True, help="list the registered models and exit")
def train_cmd(study_file, profile, overrides, device, data_path, arch, weights, epochs, lr, batch_size, out,
              model_id, no_resume, replace, rewind_epoch, list_models):
    """Train a model (from scratch or from weights) and write model.pt + meta.json.

    Runs on CPU or a GPU (bf16 autocast, channels_last); under `torchrun --nproc_per_node=N`
    it trains with DistributedDataParallel and rank 0 writes the files. An interrupted run
    resumes from its last finished epoch. Examples:

    \b
      sparsight train --data /data/imagenet --arch resnet50 --epochs 90 --set data.image_size=224
      torchrun --nproc_per_node=8 -m sparsight train --data /data/imagenet --arch googlenet --epochs 90
    """
    from .models import MODELS

    if list_models:
        for name, spec in MODELS.items():
            click.echo(f"{name:18s} input {spec.input_size:4d} px  {spec.description}")
        return
    flags = {"model.arch": arch, "model.weights": weights, "train.epochs": epochs, "train.lr": lr,
             "data.batch_size": batch_size, **_data_flags(data_path)}
    cfg = resolve_from_cli(study_file, profile, overrides, device, flags)

    from .models import read_meta
    from .stages import run_training
    from .training import TrainSettings, open_study

    with open_study(cfg) as study:
        root = study.data_root
        if cfg.data.source == "concept-shapes" and not (root / "train").is_dir():
            raise click.UsageError(f"no data at {root}; run `sparsight data synth {root}` or pass --data")
        out = out or study.layout.model_dir(model_id)
        if no_resume and (out / "train_state.pt").exists() and study.is_main:
            (out / "train_state.pt").unlink()
        rewind = cfg.prune.imp_rewind_epoch if rewind_epoch is None else rewind_epoch
        settings = TrainSettings.from_section(cfg.train, seed=cfg.study.seed)
        rewind = rewind if rewind >= 0 and cfg.train.epochs > 0 else None
        if not replace:
            _check_kept(study, out, settings, rewind)
        checkpoint, _ = run_training(study, model_id, arch=cfg.model.arch, weights=cfg.model.weights,
                                     settings=settings, out=out, rewind_epoch=rewind, reuse=not no_resume)
        if study.is_main:
            meta = read_meta(out)
            top5 = meta["top5"]["after"]
            top5 = f", top5 {top5:.4f}" if top5 is not None else ""
            click.echo(f"{model_id}: val top1 {meta['top1']['after']:.4f}{top5} → {checkpoint}")


def _check_kept(study, out: Path, settings, rewind: int | None) -> None:
    """Stop before a training run with other settings replaces the model already trained in ``out`` (a study's
    base model: its pruned models, stimuli and scores were made from it; on ImageNet, hours of training)."""
    from .models import read_meta
    from .workflows import reusable_meta, training_fingerprints

    if not (out / CHECKPOINT_FILE).is_file():
        return
    cfg = study.config
    fps = training_fingerprints(cfg, study.data_root, arch=cfg.model.arch, weights=cfg.model.weights,
                                settings=settings, rewind_epoch=rewind, new_classifier=cfg.model.new_classifier)
    if reusable_meta(out, *fps) is None:
        try:
            meta = read_meta(out)
            what = f"a model ({meta.get('arch')}, top-1 {meta['top1']['after']:.3f})"
        except (OSError, ValueError, KeyError, TypeError):
            what = "a model"
        raise click.UsageError(f"{out} already holds {what} trained with other settings or data; give --out for "
                               f"a new folder, or --replace to overwrite it")


def _data_flags(data_path) -> dict:
    """--data: the study reads this ImageFolder tree instead of its own data."""
    return {"data.source": "folder", "data.path": str(data_path)} if data_path else {}


@click.command("evaluate")
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path, resolve_path=True))
@click.option("--data", "data_path", type=click.Path(exists=True, file_okay=False, resolve_path=True), required=True,
              help="ImageFolder root holding the split to evaluate")
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="input size (default: the size the model was trained at, from its meta.json; else the "
                   "architecture's)")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_option("auto")
@click.option("--on-corrupt", type=click.Choice(["skip", "error"]), default="skip", show_default=True)
@click.option("--robustness", is_flag=True, help="add corruption accuracy (and noise similarity with --parent)")
@click.option("--parent", type=click.Path(exists=True, path_type=Path, resolve_path=True), default=None,
              help="parent checkpoint: noise similarity is top-1 agreement with it")
@click.option("--corruption", "corruptions", multiple=True, type=corruption_choice(),
              help="corruption (repeatable; default: the study's the model lies in, else all)")
@click.option("--severity", "severities", multiple=True, type=click.IntRange(1, 5), help="severity 1-5 (repeatable)")
@click.option("--max-images", type=click.IntRange(min=0), default=None,
              help="robustness on at most this many images (0 = all)")
@click.option("--write-meta", is_flag=True, help="store the result in the checkpoint's meta.json")
def evaluate_cmd(checkpoint: Path, data_path, split, image_size, batch_size, device, on_corrupt, robustness, parent,
                 corruptions, severities, max_images, write_meta):
    """Top-1/top-5 accuracy of CHECKPOINT (a model.pt or its folder) on a data split; prints JSON.

    With --robustness also top-1 under corruptions (severities 1-5, applied to tensors) and, given
    --parent, noise similarity (x + 2ε(U - 0.5), top-1 agreement with the parent), with the [evaluate]
    settings of the study the model lies in (else the built-in ones); --write-meta stores it as
    meta.json["robustness"] (not for a study's own models: their meta.json belongs to the study's stages). Examples:

    \b
      sparsight evaluate runs/default/models/base --data runs/default/data
      sparsight evaluate runs/default/models/structured-oneshot-r0.4 --data runs/default/data \\
          --robustness --parent runs/default/models/base --corruption contrast --severity 3
    """
    from .data.folders import make_loader
    from .models import get_spec, load_checkpoint, read_meta
    from .models import write_meta as save_meta
    from .training import evaluate, resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    owner = _owning_study(ckpt.path.parent)
    if write_meta and owner is not None:
        raise click.UsageError(f"{ckpt.path.parent} is a model of the study {ckpt.path.parent.parent.parent}, whose "
                               f"stages write its meta.json (a change there redoes every stage from prune on); drop "
                               f"--write-meta (the result is printed as JSON) or evaluate a copy of the model folder")
    size = image_size or _trained_size(ckpt.path.parent, owner) or get_spec(ckpt.arch).input_size
    loader = make_loader(data_path, split, image_size=size, batch_size=batch_size, train=False,
                         on_corrupt=on_corrupt, device=dev)
    _check_classes(ckpt, loader.classes, data_path)
    result = evaluate(ckpt.model, loader, device=dev)
    result.update(checkpoint=str(ckpt.path), arch=ckpt.arch, split=split, image_size=size)
    robust = None
    if robustness or parent:
        from dataclasses import replace

        from sparsight.config import EvaluateSection

        from .data.folders import ImageFolderDataset, split_dir, stratified_subset
        from .robustness import robustness_report
        section = replace(owner.evaluate if owner is not None else EvaluateSection(),
                          **{k: v for k, v in {"corruptions": list(corruptions), "severities":
                                                list(severities)}.items() if v},
                          **({"max_images": max_images} if max_images is not None else {}))
        targets = ImageFolderDataset(split_dir(data_path, split), on_corrupt=on_corrupt).targets
        subset_loader = make_loader(data_path, split, image_size=size, batch_size=batch_size, train=False,
                                    on_corrupt=on_corrupt, device=dev,
                                    subset=stratified_subset(targets, section.max_images, seed=0))
        par = load_checkpoint(parent, map_location=dev).model if parent else None
        robust = robustness_report(ckpt.model, par, subset_loader, section, device=dev)
        result["robustness"] = robust
    click.echo(json.dumps(result, indent=2))
    if write_meta:
        meta = read_meta(ckpt.path.parent)
        meta.setdefault("evaluations", {})[f"{Path(data_path).resolve()}:{split}"] = {
            k: v for k, v in result.items() if k != "robustness"}
        if robust is not None:
            meta["robustness"] = robust
        save_meta(ckpt.path.parent, meta)


def _owning_study(model_dir: Path):
    """The configuration of the study the model folder lies in (``<study>/models/<id>/``), else None."""
    from sparsight.config import study_from_run_dir
    from sparsight.layout import STUDY_FILE

    study = model_dir.parent.parent
    if model_dir.parent.name == "models" and (study / STUDY_FILE).is_file():
        return study_from_run_dir(study)
    return None


def _trained_size(model_dir: Path, owner) -> int | None:
    """The input size a study trained the model at: its meta.json's, else (a model made before meta.json
    recorded it) the data.image_size of ``owner``, the study it lies in; None if neither."""
    from .models import read_meta
    try:
        size = read_meta(model_dir).get("input_size")
    except (FileNotFoundError, ValueError):
        size = None
    if size is None and owner is not None:
        size = owner.data.image_size
    return size


def _check_classes(ckpt, classes: list[str], data_path) -> None:
    """Stop when the checkpoint was trained on other class folders than the data has (its labels would be
    read as other classes' labels)."""
    from .data.folders import class_difference
    stored = ckpt.args.get("classes")
    if not stored:
        return
    trained = json.loads(stored)
    if trained != list(classes):
        lacks, extra = class_difference(trained, list(classes))
        detail = (f"the data lacks {lacks[:5]}" if lacks else "") + ("; " if lacks and extra else "") + \
                 (f"the data has {extra[:5]} it was not trained on" if extra else "")
        raise click.UsageError(f"{ckpt.path} was trained on {len(trained)} classes, {data_path} has {len(classes)}: "
                               f"{detail or 'the same names in another order'}; its predictions would be scored "
                               f"against the wrong labels")


@click.command("prune")
@OPTIONAL_RUN_DIR
@study_options
@click.option("--parent", type=click.Path(exists=True, file_okay=False, path_type=Path, resolve_path=True),
              default=None, help="folder of the model to prune (default: <run_dir>/models/base)")
@click.option("--data", "data_path", type=click.Path(exists=True, file_okay=False, resolve_path=True), default=None,
              help="ImageFolder root with train/ and val/ (default: the study's data)")
@click.option("--method", "methods", multiple=True, type=method_choice(),
              help="pruning method (repeatable; default: the study's)")
@click.option("--rate", "rates", multiple=True, type=float, help="pruning rate in [0, 1) (repeatable)")
@click.option("--schedule", "schedules", multiple=True, type=schedule_choice(),
              help="schedule (repeatable; default: the study's)")
@click.option("--steps", type=int, default=None, help="steps of the iterative schedule")
@click.option("--epochs", type=int, default=None, help="retraining epochs (one-shot; per step when iterative)")
@click.option("--exclude", multiple=True, help="layer never pruned (repeatable; default: the stem)")
@click.option("--physical", is_flag=True, help="physically remove pruned channels (structured methods)")
@click.option("--no-robustness", is_flag=True, help="skip corruption accuracy and noise similarity")
@click.option("--out-root", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default=None,
              help="parent folder of the pruned model folders (default: <run_dir>/models)")
@click.option("--list-methods", is_flag=True, help="list the registered pruning methods and exit")
def prune_cmd(run_dir, study_file, profile, overrides, device, parent, data_path, methods, rates, schedules, steps,
              epochs, exclude, physical, no_robustness, out_root, list_methods):
    """Prune a trained model by every (method, schedule, rate), retrain, and write models/<model_id>/.

    RUN_DIR is a study directory (its study.toml is used); without it the study comes from --study,
    --profile and --set.

    meta.json reports the requested rate, the measured sparsity after retraining (total and per
    layer), params, FLOPs, top-1/top-5 of the parent and before/after retraining, and robustness.
    Examples:

    \b
      sparsight prune runs/default --method lrp --method structured --rate 0.2 --rate 0.4 --epochs 3
      sparsight prune runs/default --method structured --rate 0.5 --physical
    """
    from .methods import METHODS

    if list_methods:
        for name, cls in sorted(METHODS.items()):
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            click.echo(f"{name:20s} {'structured' if cls.structured else 'unstructured':12s} {doc}")
        return
    flags = {"prune.methods": list(methods) or None, "prune.rates": list(rates) or None,
             "prune.schedules": list(schedules) or None, "prune.iterative_steps": steps,
             "prune.retrain_epochs": epochs, "prune.iterative_epochs": epochs, "prune.exclude": list(exclude) or None,
             "prune.physical": True if physical else None, **_data_flags(data_path),
             # the jobs asked for, without the study's retrained control
             "prune.control": False if (methods or rates or schedules) else None}
    cfg = resolve_study(run_dir, study_file, profile, overrides, device, flags)
    parent = parent or Layout(cfg.run_dir).model_dir("base")
    _check_prune_parent(cfg, parent)
    if run_dir is not None and out_root is None:
        _check_study_models_kept(cfg, run_dir)

    from .stages import run_prune
    from .training import open_study

    with open_study(cfg) as study:
        run_prune(study, parent=parent, out_root=out_root, robustness=not no_robustness, on_model=_echo_pruned)


def _check_prune_parent(cfg, parent: Path) -> None:
    """The parent checkpoint exists and the layers to exclude are its own, before any work starts; a
    study without its own exclusion list takes the parent architecture's stem."""
    from .methods import PruningError, prunable_layers
    from .models import WeightsError, load_checkpoint, read_meta
    from .stages import prune_jobs

    if not (parent / CHECKPOINT_FILE).is_file():
        raise click.UsageError(f"no {CHECKPOINT_FILE} in {parent}; train one (`sparsight train`) or pass --parent")
    try:
        arch = read_meta(parent)["arch"]
    except (FileNotFoundError, ValueError, KeyError):
        arch = load_checkpoint(parent).arch
    if not cfg.prune.exclude:
        cfg.model.arch = arch  # the default exclusion list is the parent architecture's stem
    try:
        prunable_layers(load_checkpoint(parent).model, prune_jobs(cfg)[0].exclude)
    except (PruningError, WeightsError) as err:
        raise usage_error(err) from None


#: settings that choose which jobs run or where, not what a job makes
_JOB_CHOICE = {"prune.methods", "prune.rates", "prune.schedules", "prune.control", "study.device", "study.progress"}
#: sections whose settings shape a pruned model (and its robustness report)
_MODEL_SECTIONS = ("study", "data", "model", "train", "prune", "evaluate")


def _check_study_models_kept(cfg, run_dir: Path) -> None:
    """Stop before a run whose settings differ from the study's would replace one of the study's models (hours
    of retraining, and the stimuli, dissection and MIS made from it) with a model the study does not describe."""
    from sparsight.config import study_from_run_dir

    from .stages import prune_jobs

    own, now = study_from_run_dir(run_dir).to_dict(), cfg.to_dict()
    changed = [f"{section}.{key}" for section in _MODEL_SECTIONS for key in now[section]
               if f"{section}.{key}" not in _JOB_CHOICE and now[section][key] != own[section].get(key)]
    models = Layout(cfg.run_dir)
    replaced = [job.model_id for job in prune_jobs(cfg) if (models.model_dir(job.model_id) / "meta.json").is_file()]
    if changed and replaced:
        section, key = changed[0].split(".")
        raise click.UsageError(f"models/{replaced[0]} is the study's, made with {changed[0]} = "
                               f"{own[section].get(key)!r}; with {now[section][key]!r} this run would replace it: "
                               f"pass --out-root DIR to keep both, or change the study itself "
                               f"(`sparsight run {run_dir} --set {changed[0]}=...`)")


def _echo_pruned(index: int, count: int, job, meta: dict | None) -> None:
    if meta is not None:
        click.echo(f"{job.model_id}: sparsity {meta['sparsity']['total']:.4f} (requested {job.rate}), "
                   f"top1 {meta['top1']['parent']:.4f} → {meta['top1']['before']:.4f} → "
                   f"{meta['top1']['after']:.4f}, params {meta['params_nonzero']}/{meta['params_total']}")


COMMANDS = [data_group, train_cmd, prune_cmd, evaluate_cmd]
