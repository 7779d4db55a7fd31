"""Train, prune and evaluate models from a study configuration; write ``model.pt`` + ``meta.json``.

Shared by the ``sparsight train`` / ``prune`` / ``evaluate`` commands and the study stages.  A model
directory whose ``meta.json`` records the same job fingerprint and whose ``model.pt`` still has the
recorded hash is reused, so an interrupted study resumes model by model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from sparsight.files import json_digest, stable_int
from sparsight.layout import CHECKPOINT_FILE, META_FILE
from sparsight.progress import note

from .data.folders import (ImageFolderDataset, check_num_classes, folder_digest, make_loader, reference_batches,
                           split_dir, stratified_subset)
from .methods import method_class, prunable_layers
from .models import base_meta, create_model, file_sha256, get_spec, load_checkpoint, save_checkpoint, write_meta
from .models.checkpoint import atomic_save
from .models.counting import layer_sizes, measure_sparsity
from .models.layers import trace_blank
from .models.weights import weights_digest
from .schedule import prune_and_retrain
from .training import DistContext, Trainer, TrainSettings, evaluate
from .training.engine import amp_dtype, use_channels_last

REWIND_FILE = "rewind.pt"


def job_fingerprint(spec: dict) -> str:
    return json_digest(spec, 16)


def reusable_meta(out_dir: Path, *fingerprints: str) -> dict | None:
    """The meta of a finished model with one of these job fingerprints whose checkpoint is unchanged, else None."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    ckpt = out_dir / CHECKPOINT_FILE
    if meta.get("job_fingerprint") not in fingerprints or not ckpt.is_file():
        return None
    return meta if meta.get("checkpoint_sha256") == file_sha256(ckpt) else None


def data_places(cfg, data_root) -> tuple[str, str]:
    """How a job fingerprint names the data: inside the study directory relative to it (a moved or copied study
    reuses its models), elsewhere by absolute path; and, second, the absolute path models were fingerprinted
    with before, so that they are reused too."""
    root, run = Path(data_root).resolve(), Path(cfg.run_dir).resolve()
    place = f"<study>/{root.relative_to(run).as_posix()}" if root.is_relative_to(run) else str(root)
    return place, str(data_root)


def robustness_loader(cfg, data_root, ctx: DistContext):
    """The validation images robustness is measured on: a seeded, class-stratified sample of
    ``evaluate.max_images`` (all with 0), the same for every model of the study."""
    d = cfg.data
    targets = ImageFolderDataset(split_dir(data_root, "val"), on_corrupt=d.on_corrupt).targets
    subset = stratified_subset(targets, cfg.evaluate.max_images, cfg.study.seed)
    return make_loader(data_root, "val", image_size=d.image_size, batch_size=d.eval_batch_size, train=False,
                       seed=cfg.study.seed, cache=d.cache, augment=d.augment, on_corrupt=d.on_corrupt,
                       num_workers=d.num_workers, device=ctx.device, decode=d.decode, subset=subset,
                       progress=cfg.study.progress and ctx.is_main)


def batch_record(cfg, ctx: DistContext) -> dict:
    """The training batch as it was: ``data.batch_size`` per process, times the processes."""
    return {"per_process": cfg.data.batch_size, "processes": ctx.world_size}


def robustness_of(model, parent, loader, cfg, ctx: DistContext) -> dict:
    """The robustness report; under ``torchrun`` every rank evaluates its share of the batches."""
    from .robustness import robustness_report
    return robustness_report(model, parent, loader, cfg.evaluate, device=ctx.device, seed=cfg.study.seed,
                             shard=(ctx.rank, ctx.world_size),
                             reduce=ctx.all_reduce_sum if ctx.world_size > 1 else None)


class RewindSaver:
    """A batch hook that saves the weights at the start of epoch ``epoch`` (IMP rewinding target)."""

    def __init__(self, path: Path, epoch: int):
        self.path, self.epoch = path, epoch

    def __call__(self, trainer, epoch: int, batch: int) -> None:
        if epoch == self.epoch and batch == 0 and trainer.ctx.is_main and not self.path.exists():
            self.save(trainer.model)

    def holds_its_epoch(self) -> bool:
        """Whether the file is there and was saved at this saver's epoch."""
        if not self.path.is_file():
            return False
        return torch.load(self.path, map_location="cpu", weights_only=True).get("epoch") == self.epoch

    def save(self, model) -> None:
        from .models.layers import unwrap
        state = {k: v.detach().cpu().clone().contiguous() for k, v in unwrap(model).state_dict().items()}
        atomic_save({"epoch": self.epoch, "state_dict": state}, self.path)


def build_loaders(cfg, data_root: str | Path, ctx: DistContext, *, train: bool = True, val: bool = True):
    """Train and validation loaders for ``data_root`` according to ``cfg.data``."""
    d = cfg.data
    common = dict(image_size=d.image_size, cache=d.cache, augment=d.augment, on_corrupt=d.on_corrupt,
                  num_workers=d.num_workers, device=ctx.device, decode=d.decode,
                  rank=ctx.rank, world_size=ctx.world_size, progress=cfg.study.progress and ctx.is_main,
                  seed=cfg.study.seed)
    train_loader = make_loader(data_root, "train", batch_size=d.batch_size, train=True, **common) if train else None
    val_loader = make_loader(data_root, "val", batch_size=d.eval_batch_size, train=False, **common) if val else None
    return train_loader, val_loader


ROBUSTNESS_SUBSET = "stratified-v1"     # how robustness images are chosen; a change refreshes old reports
ROBUSTNESS_RECORD = "per-image-v1"      # what a report holds (per-image results); a change refreshes old reports
#: settings of the study tables only: changing them recomputes no model's report
TABLE_SETTINGS = ("prune_potential_delta", "prune_potential_bootstrap")


def _robustness_fingerprint(cfg, parent_sha: str | None, device: torch.device) -> str:
    """What a robustness report depends on.  The corruption noise is drawn per evaluation batch by a
    generator on the device, so the batch size and (beyond the CPU) the device type are part of it:
    every model of a study is measured on the same noise, also when the study moves to a GPU."""
    evaluate = {k: v for k, v in asdict(cfg.evaluate).items() if k not in TABLE_SETTINGS}
    noise = {} if torch.device(device).type == "cpu" else {"noise_device": torch.device(device).type}
    return job_fingerprint({"evaluate": evaluate, "parent": parent_sha, "seed": cfg.study.seed,
                            "subset": ROBUSTNESS_SUBSET, "record": ROBUSTNESS_RECORD,
                            "eval_batch_size": cfg.data.eval_batch_size, **noise})


def refresh_robustness(cfg, data_root, out_dir: Path, meta: dict, ctx: DistContext, parent=None,
                       parent_sha: str | None = None) -> dict:
    """Recompute ``meta["robustness"]`` of a finished model when the evaluation settings changed."""
    fp = _robustness_fingerprint(cfg, parent_sha, ctx.device)
    if meta.get("robustness", {}).get("fingerprint") == fp:
        return meta
    model = load_checkpoint(out_dir / CHECKPOINT_FILE, map_location=ctx.device).model
    meta["robustness"] = {**robustness_of(model, parent, robustness_loader(cfg, data_root, ctx), cfg, ctx),
                          "fingerprint": fp}
    if ctx.is_main:
        write_meta(out_dir, meta)
    return meta


def training_fingerprints(cfg, data_root, *, arch: str, weights: str, settings: TrainSettings,
                          rewind_epoch: int | None, new_classifier: bool = False) -> tuple[str, str]:
    """The job fingerprints of a training run (see :func:`data_places` for why two): a model folder holding
    one of them holds this run's result."""
    d = cfg.data
    spec = {"arch": arch, "weights": weights, "weights_digest": weights_digest(arch, weights),
            "settings": asdict(settings), "files": folder_digest(data_root),
            "loader": [d.image_size, d.batch_size, d.augment, d.cache], "rewind": rewind_epoch,
            "num_classes": cfg.model.num_classes, **({"new_classifier": True} if new_classifier else {})}
    fp, earlier = (job_fingerprint({**spec, "data": place}) for place in data_places(cfg, data_root))
    return fp, earlier


def train_and_save(cfg, data_root: str | Path, out_dir: str | Path, ctx: DistContext, *, model_id: str,
                   arch: str, weights: str = "", settings: TrainSettings, rewind_epoch: int | None = None,
                   robustness: bool = False, reuse: bool = True, new_classifier: bool = False) -> dict:
    """Build (or load) ``arch``, train ``settings.epochs`` epochs, save checkpoint and meta; return meta.

    ``rewind_epoch`` also saves the weights at the start of that epoch (``rewind.pt``, for IMP);
    ``robustness`` adds corruption accuracy to the meta; ``new_classifier`` loads ``weights`` but their classifier.
    """
    out_dir = Path(out_dir)
    fp, earlier = training_fingerprints(cfg, data_root, arch=arch, weights=weights, settings=settings,
                                        rewind_epoch=rewind_epoch, new_classifier=new_classifier)
    meta = reusable_meta(out_dir, fp, earlier) if reuse else None
    if meta is not None:
        return refresh_robustness(cfg, data_root, out_dir, meta, ctx) if robustness else meta
    train_loader, val_loader = build_loaders(cfg, data_root, ctx, train=settings.epochs > 0)
    num_classes = check_num_classes(cfg.model.num_classes, val_loader.classes) or len(val_loader.classes)
    torch.manual_seed(settings.seed)  # the initial weights are a function of the seed, on every rank
    model = create_model(arch, num_classes=num_classes, weights=weights or None, new_classifier=new_classifier)
    trace_blank(model, cfg.data.image_size)     # an input too small for the network: one line, before any epoch
    amp, cl = amp_dtype(settings.amp, ctx.device), use_channels_last(settings.channels_last)
    before = evaluate(model.to(ctx.device), val_loader, ctx=ctx, amp=amp) if weights else None
    rewind = RewindSaver(out_dir / REWIND_FILE, rewind_epoch) if rewind_epoch is not None else None
    trainer = Trainer(model, settings, ctx=ctx, out_dir=out_dir, progress=cfg.study.progress,
                      batch_hooks=[rewind] if rewind else ())
    resume = _keep_rewind_point(trainer, rewind) if rewind is not None and settings.epochs > 0 else True
    history = trainer.fit(train_loader, val_loader, resume=resume) if settings.epochs > 0 else []
    if rewind is not None and ctx.is_main and not rewind.path.exists():
        rewind.save(trainer.model)  # the rewind epoch is past the end: the trained weights
    after = history[-1]["val"] if history else evaluate(trainer.model, val_loader, ctx=ctx, amp=amp, channels_last=cl)
    model = trainer.model.float().to(memory_format=torch.contiguous_format)
    robust = {}
    if robustness:
        robust = {**robustness_of(model, None, robustness_loader(cfg, data_root, ctx), cfg, ctx),
                  "fingerprint": _robustness_fingerprint(cfg, None, ctx.device)}
    if ctx.is_main:
        sha = save_checkpoint(out_dir / CHECKPOINT_FILE, model, num_classes=num_classes,
                              args={"settings": json.dumps(asdict(settings)), "data": data_places(cfg, data_root)[0],
                                    "weights": weights, "classes": json.dumps(val_loader.classes)})
        meta = base_meta(model.cpu(), model_id=model_id, input_size=cfg.data.image_size, seed=settings.seed,
                         top1={"before": before and before["top1"], "after": after["top1"]},
                         top5={"before": before and before["top5"], "after": after["top5"]},
                         retrain={k: getattr(settings, k) for k in ("epochs", "optimizer", "lr", "momentum",
                                                                    "nesterov", "weight_decay", "scheduler")},
                         weights=weights or None, classes=val_loader.classes, history=history,
                         stem=list(get_spec(arch).stem), robustness=robust, job_fingerprint=fp,
                         checkpoint_sha256=sha, rewind_epoch=rewind_epoch, batch=batch_record(cfg, ctx))
        write_meta(out_dir, meta)
        trainer.clear_state()
    ctx.barrier()
    return meta


def retrain_seed(study_seed: int, model_id: str) -> int:
    """The retraining seed of one model: its own (data order, augmentation, dropout), so the models of a study
    are independent draws of retraining noise, as the analysis clustered by model takes them; stable under
    adding or dropping other models."""
    return stable_int(f"{study_seed}:{model_id}", 6, "big")


def retrain_settings(cfg, epochs: int | None = None, model_id: str | None = None) -> TrainSettings:
    """Retraining settings from ``cfg.prune`` (seed-paper defaults: SGD 0.01, momentum 0.9 without Nesterov,
    wd 1e-4, γ 0.9); the seed is ``model_id``'s own (:func:`retrain_seed`), else the study's seed + 2."""
    p = cfg.prune
    seed = cfg.study.seed + 2 if model_id is None else retrain_seed(cfg.study.seed, model_id)
    return TrainSettings.from_section(cfg.train, epochs=p.retrain_epochs if epochs is None else epochs,
                                      optimizer=p.retrain_optimizer, lr=p.retrain_lr, momentum=p.retrain_momentum,
                                      nesterov=False, weight_decay=p.retrain_weight_decay,
                                      scheduler=p.retrain_scheduler, gamma=p.retrain_gamma, seed=seed)


def default_exclude(cfg, arch: str) -> tuple[str, ...]:
    return tuple(cfg.prune.exclude) or tuple(get_spec(arch).stem)


def prune_and_save(cfg, data_root: str | Path, parent_dir: str | Path, out_dir: str | Path, ctx: DistContext,
                   job, *, robustness: bool = True, loaders=None, cache: dict | None = None,
                   reuse: bool = True) -> dict:
    """Prune the model in ``parent_dir`` by ``job`` (a ``PruneJob``), retrain, evaluate; write model and meta.

    ``loaders`` (train, val) and ``cache`` (a dict kept across calls) let a study share decoded data,
    the parent's accuracy and the reference set between its jobs.
    """
    cache = {} if cache is None else cache
    parent_dir, out_dir = Path(parent_dir), Path(out_dir)
    parent_ckpt = load_checkpoint(parent_dir / CHECKPOINT_FILE, map_location=ctx.device)
    settings = retrain_settings(cfg, cfg.prune.iterative_epochs if job.schedule == "iterative" else None,
                                job.model_id)
    p, d = cfg.prune, cfg.data
    method = job.method_instance(d.image_size)
    fp, earlier = (_prune_fingerprint(cfg, place, job, parent_ckpt.sha256, settings, method)
                   for place in data_places(cfg, data_root))
    meta = reusable_meta(out_dir, fp, earlier) if reuse else None
    if meta is not None:
        if robustness:
            meta = refresh_robustness(cfg, data_root, out_dir, meta, ctx, parent_ckpt.model, parent_ckpt.sha256)
        return meta
    train_loader, val_loader = loaders or build_loaders(cfg, data_root, ctx, train=settings.epochs > 0)
    amp = amp_dtype(settings.amp, ctx.device)      # the parent at the precision its children are validated at
    parent_eval = _cached(cache, ("parent_eval", parent_ckpt.sha256, str(amp)),
                          lambda: evaluate(parent_ckpt.model, val_loader, ctx=ctx, amp=amp))
    reference = _cached(cache, "reference", lambda: _reference_set(cfg, data_root)) if method.needs_data else None
    rewind_state, rewind_source = _rewind_target(parent_dir, parent_ckpt, ctx) if method.rewinds else (None, None)
    torch.manual_seed(settings.seed)
    model = copy.deepcopy(parent_ckpt.model)  # the parent stays intact for noise similarity
    sizes = layer_sizes(model)
    outcome = prune_and_retrain(model, job, settings=settings, train_loader=train_loader, val_loader=val_loader,
                                ctx=ctx, reference=reference, rewind_state=rewind_state, work_dir=out_dir,
                                progress=cfg.study.progress, input_size=d.image_size,
                                recalibrate_batches=p.bn_recalibration_batches)
    model = outcome.model.float().to(memory_format=torch.contiguous_format)
    scope = [k.removesuffix(".weight") for k in _scope_keys(model, job, d.image_size)]
    robust = _robustness_against(model, parent_ckpt, cfg, data_root, ctx, cache) if robustness else {}
    if ctx.is_main:
        sha = _save_pruned(out_dir, model, outcome, job, settings, parent_ckpt)
        meta = base_meta(model.cpu(), model_id=job.model_id, input_size=d.image_size, seed=settings.seed,
                         parent=parent_ckpt.sha256, parent_model=parent_dir.name,
                         **_pruned_meta_fields(job, outcome, settings, parent_eval),
                         sparsity={**measure_sparsity(model, scope=scope, reference=sizes),
                                   "effective": effective_sparsity(model, outcome, job, scope, sizes, d.image_size)},
                         rewind=rewind_source, robustness=robust, job_fingerprint=fp, checkpoint_sha256=sha,
                         batch=batch_record(cfg, ctx))
        write_meta(out_dir, meta)
    ctx.barrier()
    return meta


def _prune_fingerprint(cfg, data_place: str, job, parent_sha: str, settings: TrainSettings, method) -> str:
    """What a pruned model depends on: job, parent, retraining, data (as :func:`data_places` names it),
    reference set, a filter criterion's layer scaling, BN recalibration."""
    p, d = cfg.prune, cfg.data
    return job_fingerprint({"job": asdict(job), "parent": parent_sha, "settings": asdict(settings),
                            "data": data_place, "loader": [d.image_size, d.batch_size, d.augment, d.cache],
                            "reference": p.lrp_images_per_class if method.needs_data else None,
                            **({"layer_scale": method.layer_scale} if hasattr(method, "layer_scale") else {}),
                            **({"bn_recalibration": p.bn_recalibration_batches}
                               if p.bn_recalibration_batches else {})})


def _cached(cache: dict, key, compute):
    """``cache[key]``, computed once."""
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def _reference_set(cfg, data_root) -> list:
    """The reference images data-driven criteria score filters on."""
    p, d = cfg.prune, cfg.data
    return reference_batches(data_root, "train", image_size=d.image_size, per_class=p.lrp_images_per_class,
                             seed=cfg.study.seed, batch_size=d.eval_batch_size, on_corrupt=d.on_corrupt)


def _keep_rewind_point(trainer: Trainer, rewind: RewindSaver) -> bool:
    """Prepare ``rewind.pt`` for a training run that may resume an interrupted one; return whether it resumes.

    Resumed past the rewind epoch, the run keeps the interrupted run's rewind weights, which its hook will not
    save again; were they lost, it trains from scratch instead (resuming would leave IMP no rewind point).
    Otherwise (from scratch, or resumed before that epoch) an old file goes, and the hook saves it anew."""
    start = trainer.resume_point()
    if start > rewind.epoch and rewind.holds_its_epoch():
        return True
    trainer.ctx.barrier()                       # every rank has read the file before it goes
    if trainer.ctx.is_main:
        rewind.path.unlink(missing_ok=True)
    trainer.ctx.barrier()
    if start > rewind.epoch:
        note(f"{trainer.out_dir}: the interrupted training's IMP rewind point (epoch {rewind.epoch}) is missing; "
             "training again from the start")
        return False
    return True


def _rewind_target(parent_dir: Path, parent_ckpt, ctx: DistContext) -> tuple[dict, str]:
    """The weights IMP rewinds to, and where they come from."""
    rewind_path = parent_dir / REWIND_FILE
    if rewind_path.is_file():
        state = torch.load(rewind_path, map_location=ctx.device, weights_only=True)["state_dict"]
        epoch = json.loads((parent_dir / META_FILE).read_text()).get("rewind_epoch")
        return state, f"{REWIND_FILE} (epoch {epoch})"
    # a parent from a weights file has no training history: rewind to the parent itself
    return {k: v.clone() for k, v in parent_ckpt.model.state_dict().items()}, "parent weights"


def _robustness_against(model, parent_ckpt, cfg, data_root, ctx: DistContext, cache: dict) -> dict:
    """``meta["robustness"]`` of a pruned model, with noise similarity against its parent."""
    loader = _cached(cache, "robustness_loader", lambda: robustness_loader(cfg, data_root, ctx))
    return {**robustness_of(model, parent_ckpt.model, loader, cfg, ctx),
            "fingerprint": _robustness_fingerprint(cfg, parent_ckpt.sha256, ctx.device)}


def _save_pruned(out_dir: Path, model, outcome, job, settings: TrainSettings, parent_ckpt) -> str:
    """Write the pruned ``model.pt`` (masks, job, settings, parent, channel map); return its sha256."""
    args = {"job": json.dumps(asdict(job)), "settings": json.dumps(asdict(settings)),
            "parent": parent_ckpt.sha256, "classes": parent_ckpt.args.get("classes", "")}
    if outcome.physical is not None:
        args["channel_map"] = json.dumps(outcome.physical.channel_map)
    return save_checkpoint(out_dir / CHECKPOINT_FILE, model, num_classes=parent_ckpt.num_classes, masks=outcome.masks,
                           args=args, physical=job.is_physical)


def _pruned_meta_fields(job, outcome, settings: TrainSettings, parent_eval: dict) -> dict:
    """The meta.json keys of a pruned model that describe its job, steps and accuracies."""
    before, after = outcome.before or {}, outcome.after or {}
    recalibrated = outcome.before_recalibrated or {}
    physical = outcome.physical

    def accuracy(key: str) -> dict:
        return {"parent": parent_eval[key], "before": before.get(key), "after": after.get(key),
                **({"before_recalibrated": recalibrated[key]} if recalibrated else {})}
    return dict(method=job.method, criterion=criterion_name(job), schedule=job.schedule, rate_requested=job.rate,
                copy=job.copy,
                steps=[{k: v for k, v in st.items() if k != "history"} for st in outcome.steps],
                history=[h for st in outcome.steps for h in st["history"]],
                top1=accuracy("top1"), top5=accuracy("top5"),
                retrain={**{k: getattr(settings, k) for k in ("epochs", "optimizer", "lr", "momentum", "nesterov",
                                                              "weight_decay", "scheduler", "gamma")},
                         "epochs_in_all": len(outcome.steps) * settings.epochs},
                exclude=list(job.exclude), physical=job.is_physical,
                physical_removal=physical.summary() if physical is not None else None)


def effective_sparsity(model, outcome, job, scope: list[str], sizes: dict[str, int], input_size: int) -> float:
    """Share of the scope's weights that are zero or act on a channel the masks remove whole: what a
    physically pruned model counts (its removed filters' input slices in the next layers included), so a
    masked and a physically pruned structured model of one job report the same.  For methods that remove
    no whole filter it is the measured sparsity."""
    if job.is_physical or not method_class(job.method).structured:
        return measure_sparsity(model, scope=scope, reference=sizes)["total"]
    from .physical import remove_pruned_filters

    twin = copy.deepcopy(model).cpu()
    remove_pruned_filters(twin, {k: v.cpu() for k, v in outcome.masks.items()}, input_size=input_size, verify=False)
    return measure_sparsity(twin, scope=scope, reference=sizes)["total"]


def _scope_keys(model, job, input_size: int) -> list[str]:
    """Weight names of the layers ``job``'s method prunes (the scope of the measured sparsity)."""
    method = job.method_instance(input_size)
    return [f"{n}.weight" for n in prunable_layers(model, job.exclude, method.kinds)]


def criterion_name(job) -> str:
    """What ``job``'s method ranks by, as meta.json records it."""
    return method_class(job.method).criterion.format(norm=job.norm) or job.method
