"""``sparsight stimuli``: natural exemplars and feature visualizations into the study's stimulus bank;
``sparsight dissect``: Network Dissection of every model of the study."""
from __future__ import annotations

from pathlib import Path

import click

from sparsight.clitools import OPTIONAL_RUN_DIR, resolve_study, study_options, usage_error
from sparsight.config import STIMULUS_KINDS
from sparsight.files import absolute

WHAT = {"exemplars": ("natural",), "featurevis": ("synthetic",), "all": ("natural", "synthetic")}


def _what_and_run_dir(ctx, _param, values: tuple[str, ...]):
    """``[exemplars|featurevis|all] [RUN_DIR]``, either one optional."""
    values = list(values)
    what = values.pop(0) if values and values[0] in WHAT else "all"
    if len(values) > 1:
        raise click.BadParameter(f"expected [{'|'.join(WHAT)}] [RUN_DIR], got {' '.join(values)!r}", ctx=ctx)
    run_dir = None
    if values:
        run_dir = absolute(values[0])
        if not run_dir.is_dir():
            raise click.BadParameter(f"{values[0]!r} is neither one of {list(WHAT)} nor a study directory", ctx=ctx)
    return what, run_dir


@click.command("stimuli")
@click.argument("what_and_run_dir", nargs=-1, metavar=f"[{'|'.join(WHAT)}] [RUN_DIR]", callback=_what_and_run_dir)
@study_options
@click.option("--model", "models", multiple=True, help="model id under <run_dir>/models (repeatable; default: all)")
@click.option("--unit", "units", multiple=True, metavar="LAYER:INDEX[-LAST]",
              help="explicit units instead of the study's sample, e.g. inception4a:3 (repeatable)")
@click.option("--fresh", is_flag=True, help="discard finished units and make them again")
@click.option("--preview", metavar="MODEL:LAYER:UNIT", default=None,
              help="only write a contact sheet of one task of this unit (from the existing bank)")
@click.option("--task", type=int, default=0, show_default=True, help="task shown by --preview")
@click.option("--kind", type=click.Choice(list(STIMULUS_KINDS)), default="natural", show_default=True,
              help="reference kind shown by --preview")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path, resolve_path=True), default=None,
              help="preview file (default: <run_dir>/stimuli/preview-<model>-<layer>-<unit>-<task>-<kind>.png)")
def stimuli_cmd(what_and_run_dir, study_file, profile, overrides, device, models, units, fresh, preview, task, kind,
                out):
    """Make stimuli (exemplars, featurevis, or all) for every model and unit of a study.

    RUN_DIR is a study directory (its study.toml is used); without it the study comes from --study,
    --profile and --set. With --model or --unit only those models or units are made again; every
    other model's and unit's stimuli stay in the bank and the manifest.

    Natural exemplars come from one streamed pass over the data split (top and bottom
    N·(K+1) images per unit, fair batches); feature visualizations are optimized many units at a
    time. Images are stored content-addressed in <run_dir>/stimuli/images/ and described by
    stimuli/manifest.parquet; finished units are skipped on a rerun. Under torchrun the ranks share
    the work (mining: every world_size-th batch of images; rendering: every world_size-th unit or
    feature-visualization batch) and the bank equals a single-process run's. Examples:

    \b
      sparsight stimuli exemplars runs/default --model base --unit inception4a:0-7
      sparsight stimuli runs/default --preview base:inception4a:3 --task 2
      torchrun --nproc_per_node=8 -m sparsight stimuli --study studies/googlenet-imagenet.toml
    """
    what, run_dir = what_and_run_dir
    cfg = resolve_study(run_dir, study_file, profile, overrides, device)
    from sparsight.layout import Layout

    from .bank import StimulusBank
    layout = Layout(cfg.run_dir)
    if preview:
        from .preview import write_preview
        try:
            model_id, layer, unit = preview.rsplit(":", 2)
            unit = int(unit)
        except ValueError:
            raise click.UsageError(f"--preview takes MODEL:LAYER:UNIT, e.g. base:inception4a:3 (got {preview!r})")
        bank = StimulusBank(layout.stimuli)
        try:
            manifest = bank.manifest()
            out = out or layout.stimuli / f"preview-{model_id}-{layer}-{unit}-{task}-{kind}.png"
            order = write_preview(manifest, bank.root, out, model_id=model_id, layer=layer, unit=unit, task=task,
                                  kind=kind, seed=cfg.study.seed)
        except (FileNotFoundError, ValueError) as err:
            raise usage_error(err) from None
        click.echo(f"{out}  (queries top to bottom: {', '.join(order)})")
        return
    from pruning.training import open_study

    from .stages import run_stimuli
    with open_study(cfg) as study:
        try:
            files = run_stimuli(study, kinds=WHAT[what], model_ids=list(models) or None, units=list(units),
                                fresh=fresh)
        except ValueError as err:
            raise usage_error(err) from None
    if not files:    # another rank of a torchrun job: rank 0 reports
        return
    import pandas as pd
    manifest, status = files
    table = pd.read_parquet(manifest)
    click.echo(f"{manifest}: {len(table)} rows, {table['image'].nunique()} images; unit status in {status}")


@click.command("dissect")
@OPTIONAL_RUN_DIR
@study_options
@click.option("--model", "models", multiple=True,
              help="model id under <run_dir>/models (repeatable; default: every model but the observer)")
@click.option("--probe", type=click.Path(file_okay=False, path_type=Path, resolve_path=True), default=None,
              help="probe folder: a Broden release (index.csv, label.csv, category.csv, images/) or concepts.json, "
                   "images/**, masks/** (default: dissection.probe, else the study data's concept masks)")
@click.option("--fresh", is_flag=True, help="dissect every model again, even if its results are current")
def dissect_cmd(run_dir, study_file, profile, overrides, device, models, probe, fresh):
    """Network Dissection: label every unit with the concept its top activations overlap best.

    RUN_DIR is a study directory (its study.toml is used); without it the study comes from --study,
    --profile and --set.
    Per unit, the threshold is the dissection.quantile (0.995) of its activations over the probe
    set; activation maps are upsampled to the label maps and IoU = Σ|M ∩ L| / Σ|M ∪ L| over the
    images annotated in the concept's category; a unit is interpretable when its best IoU exceeds
    dissection.iou_threshold (0.04). Writes <run_dir>/dissection/units.csv (one row per model and
    unit), models.csv (interpretable units and unique concepts per model) and iou.parquet
    (unit × concept). Examples:

    \b
      sparsight dissect runs/default --model base --set dissection.units=study
      sparsight dissect runs/googlenet-imagenet --probe /data/broden1_224
    """
    cfg = resolve_study(run_dir, study_file, profile, overrides, device)
    from pruning.training import open_study

    from .stages import run_dissection
    with open_study(cfg) as study:
        try:
            units_csv, models_csv, _ = run_dissection(study, model_ids=list(models) or None, probe=probe, fresh=fresh)
        except ValueError as err:   # ProbeError is a ValueError
            raise usage_error(err) from None
    import pandas as pd
    table = pd.read_csv(models_csv)
    click.echo(f"{'model':28s} {'units':>6s} {'interpretable':>13s} {'unique concepts':>15s}")
    for r in table.itertuples():
        shown = "skipped" if r.status == "skipped" else f"{r.interpretable:d}"
        click.echo(f"{r.model_id:28s} {r.units:6d} {shown:>13s} {r.unique_concepts:15d}")
    click.echo(f"per-unit results in {units_csv}")


COMMANDS = [stimuli_cmd, dissect_cmd]
