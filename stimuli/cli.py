"""``sparsight stimuli``: natural exemplars and feature visualizations into the study's stimulus bank."""
from __future__ import annotations

from pathlib import Path

import click

from sparsight.clitools import resolve_from_cli, study_options

WHAT = {"exemplars": ("natural",), "featurevis": ("synthetic",), "all": ("natural", "synthetic")}


@click.command("stimuli")
@click.argument("what", type=click.Choice(list(WHAT)), default="all")
@study_options
@click.option("--model", "models", multiple=True, help="model id under <run_dir>/models (repeatable; default: all)")
@click.option("--unit", "units", multiple=True, metavar="LAYER:INDEX[-LAST]",
              help="explicit units instead of the study's sample, e.g. inception4a:3 (repeatable)")
@click.option("--fresh", is_flag=True, help="discard finished units and make them again")
@click.option("--preview", metavar="MODEL:LAYER:UNIT", default=None,
              help="only write a contact sheet of one task of this unit (from the existing bank)")
@click.option("--task", type=int, default=0, show_default=True, help="task shown by --preview")
@click.option("--kind", type=click.Choice(["natural", "synthetic"]), default="natural", show_default=True,
              help="reference kind shown by --preview")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="preview file (default: <run_dir>/stimuli/preview-<model>-<layer>-<unit>-<task>.png)")
def stimuli_cmd(what, study_file, profile, overrides, device, models, units, fresh, preview, task, kind, out):
    """Make stimuli (WHAT: exemplars, featurevis, or all) for every model and unit of a study.

    Natural exemplars come from one streamed pass over the data split (top and bottom
    N·(K+1) images per unit, fair batches); feature visualizations are optimized many units at a
    time. Images are stored content-addressed in <run_dir>/stimuli/images/ and described by
    stimuli/manifest.parquet; finished units are skipped on a rerun. Example:

      sparsight stimuli exemplars --model base --unit inception4a:0-7
      sparsight stimuli --preview base:inception4a:3 --task 2
    """
    cfg = resolve_from_cli(study_file, profile, overrides, device)
    from sparsight.study import Study

    from .bank import StimulusBank
    study = Study(cfg)
    if preview:
        from .preview import write_preview
        try:
            model_id, layer, unit = preview.rsplit(":", 2)
            unit = int(unit)
        except ValueError:
            raise click.UsageError(f"--preview takes MODEL:LAYER:UNIT, e.g. base:inception4a:3 (got {preview!r})")
        bank = StimulusBank(study.path("stimuli"))
        try:
            manifest = bank.manifest()
            out = out or study.path("stimuli", f"preview-{model_id}-{layer}-{unit}-{task}.png")
            order = write_preview(manifest, bank.root, out, model_id=model_id, layer=layer, unit=unit, task=task,
                                  kind=kind, seed=cfg.study.seed)
        except (FileNotFoundError, ValueError) as err:
            raise click.UsageError(str(err)) from None
        click.echo(f"{out}  (queries top to bottom: {', '.join(order)})")
        return
    from pruning.training import init_distributed

    from .stages import build_stimuli
    study.ctx = init_distributed(cfg.study.device)
    try:
        manifest, status = build_stimuli(study, kinds=WHAT[what], model_ids=list(models) or None, units=list(units),
                                         fresh=fresh)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    finally:
        study.ctx.close()
    import pandas as pd
    table = pd.read_parquet(manifest)
    click.echo(f"{manifest}: {len(table)} rows, {table['image'].nunique()} images; unit status in {status}")


COMMANDS = [stimuli_cmd]
