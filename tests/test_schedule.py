"""Schedules, retraining with masks, IMP rewinding, the prune workflow and its command."""
import json

import pytest
import torch
from click.testing import CliRunner

from pruning.data.folders import make_loader, reference_batches
from pruning.methods import METHODS, PruningError, create_method
from pruning.models import count_params, create_model, get_spec, load_checkpoint, measure_sparsity, read_meta
from pruning.schedule import PruneJob, prune_and_retrain, step_rates
from pruning.training import TrainSettings
from pruning.workflows import retrain_seed
from sparsight.cli import main

STEM = get_spec("inception-small").stem


@pytest.fixture(scope="module")
def loaders(tiny_data):
    common = {"image_size": 32, "cache": "memory", "augment": "shift-flip", "device": "cpu", "seed": 0}
    return (make_loader(tiny_data, "train", batch_size=32, train=True, **common),
            make_loader(tiny_data, "val", batch_size=64, train=False, **common))


@pytest.fixture(scope="module")
def reference(tiny_data):
    return reference_batches(tiny_data, "train", image_size=32, per_class=2, seed=0)


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("inception-small", num_classes=10)


SETTINGS = TrainSettings(epochs=1, lr=0.01, scheduler="exponential", weight_decay=1e-4, nesterov=False, seed=5)


def test_step_rates_compound_to_the_requested_rate():
    assert step_rates(0.6, "oneshot") == [0.6]
    rates = step_rates(0.8, "iterative", 3)
    assert rates[-1] == pytest.approx(0.8)
    kept = [1 - r for r in rates]
    assert kept[1] / kept[0] == pytest.approx(kept[0]) and kept[2] / kept[1] == pytest.approx(kept[0])
    with pytest.raises(PruningError, match=r"unknown schedule 'gradual'; choose from \['oneshot', 'iterative'\]"):
        step_rates(0.5, "gradual")


@pytest.mark.parametrize("method", sorted(m for m in METHODS if METHODS[m].prunes))
def test_measured_sparsity_after_retraining_meets_the_requested_rate(method, loaders, reference):
    model = _model()
    job = PruneJob(method, 0.5, exclude=STEM)
    rewind = {k: v.clone() for k, v in model.state_dict().items()} if METHODS[method].rewinds else None
    out = prune_and_retrain(model, job, settings=SETTINGS, train_loader=loaders[0], val_loader=loaders[1],
                            reference=reference, rewind_state=rewind, progress=False, input_size=32)
    assert out.steps[0]["history"], "retraining ran"
    scope = [n.removesuffix(".weight") for n in out.masks if n.endswith(".weight") and out.masks[n].dim() > 1
             and not any(n.startswith(s + ".") for s in STEM)]
    measured = measure_sparsity(out.model, scope=scope)
    assert measured["total"] >= 0.5 - 0.005
    params = dict(out.model.named_parameters())
    for name, mask in out.masks.items():  # nothing regrew during SGD with momentum and weight decay
        assert torch.all(params[name].detach()[~mask.bool()] == 0), name


@pytest.mark.parametrize("method", ["random", "structured", "lrp"])
def test_iterative_masks_are_nested_and_reach_the_rate(method, loaders, reference):
    model = _model(1)
    seen = []
    job = PruneJob(method, 0.6, schedule="iterative", steps=3, exclude=STEM)
    import pruning.schedule as schedule
    real = schedule.apply_masks

    def spy(m, masks):
        seen.append({k: v.clone() for k, v in masks.items()})
        real(m, masks)
    schedule.apply_masks = spy
    try:
        out = prune_and_retrain(model, job, settings=SETTINGS, train_loader=loaders[0], val_loader=loaders[1],
                                reference=reference, progress=False, input_size=32)
    finally:
        schedule.apply_masks = real
    assert [s["step"] for s in out.steps] == [1, 2, 3]
    for earlier, later in zip(seen, seen[1:]):
        for k in earlier:
            assert not torch.any(later[k] & ~earlier[k]), f"{k} regrew between steps"
    sparsity = [s["mask_sparsity"] for s in out.steps]
    assert sparsity == sorted(sparsity) and sparsity[0] < sparsity[-1]


def test_imp_rewinds_surviving_weights_to_the_early_state(loaders):
    early = _model(2)
    rewind = {k: v.clone() for k, v in early.state_dict().items()}
    trained = _model(3)  # stands in for the trained parent: different weights
    job = PruneJob("imp", 0.5, exclude=STEM)
    no_training = TrainSettings(epochs=0)
    out = prune_and_retrain(trained, job, settings=no_training, train_loader=loaders[0], val_loader=loaders[1],
                            rewind_state=rewind, progress=False, input_size=32)
    params = dict(out.model.named_parameters())
    expected = create_method("unstructured-global").masks(_model(3), 0.5, exclude=STEM)  # ranked on trained weights
    assert out.masks.keys() == expected.keys()
    for name, mask in out.masks.items():
        assert torch.equal(mask, expected[name])
        assert torch.equal(params[name].detach(), rewind[name] * mask)
    with pytest.raises(PruningError, match="rewinds weights"):
        prune_and_retrain(_model(), job, settings=no_training, train_loader=loaders[0], val_loader=loaders[1])


def test_physical_job_gives_a_smaller_model_with_the_masked_function(loaders):
    model = _model(4)
    job = PruneJob("structured", 0.5, exclude=STEM, physical=True)
    assert job.model_id == "structured-oneshot-r0.50-physical"
    masked_twin = _model(4)
    out = prune_and_retrain(model, job, settings=TrainSettings(epochs=0), train_loader=loaders[0],
                            val_loader=loaders[1], progress=False, input_size=32)
    assert out.physical is not None and out.physical.removed_total > 0
    assert count_params(out.model)[0] < count_params(masked_twin)[0]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "prune-all", "rate": 0.5}, "unknown method 'prune-all'; choose from ['connection'"),
    ({"method": "structured", "rate": 1.0}, "rate 1.0 is outside [0, 1)"),
    ({"method": "structured", "rate": 0.5, "schedule": "later"}, "unknown schedule 'later'"),
])
def test_bad_jobs_are_clear_errors(kwargs, fragment):
    with pytest.raises(PruningError) as err:
        PruneJob(**kwargs)
    assert fragment in str(err.value)


@pytest.fixture(scope="module")
def trained_base(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    common = ["--set", f'study.output_dir="{out}"', "--set", 'study.name="t"', "--set", "data.image_size=32",
              "--set", "study.progress=false", "--set", 'data.source="folder"',
              "--set", f'data.path="{tiny_data}"', "--device", "cpu"]
    result = CliRunner().invoke(main, ["train", "--epochs", "1", *common])
    assert result.exit_code == 0, result.output
    return out / "t", common


def test_prune_command_writes_models_with_measured_sparsity_and_robustness(trained_base):
    run_dir, common = trained_base
    args = ["prune", "--method", "unstructured-global", "--method", "lrp", "--rate", "0.4", "--epochs", "1",
            "--set", "prune.lrp_images_per_class=2", "--set", "evaluate.max_images=30",
            "--set", "evaluate.severities=[1]", "--set", "evaluate.noise_levels=3", *common]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    parent_sha = load_checkpoint(run_dir / "models" / "base").sha256
    for mid in ("unstructured-global-oneshot-r0.40", "lrp-oneshot-r0.40"):
        meta = read_meta(run_dir / "models" / mid)
        ckpt = load_checkpoint(run_dir / "models" / mid)
        assert meta["parent"] == parent_sha and meta["rate_requested"] == 0.4
        assert meta["sparsity"]["total"] >= 0.4 - 0.005
        assert meta["sparsity"]["total"] == measure_sparsity(ckpt.model, scope=meta["sparsity"]["scope"])["total"]
        assert set(meta["top1"]) == {"parent", "before", "after"}
        assert meta["robustness"]["noise_similarity"]["eps"][0] == 0.0
        assert set(meta["robustness"]["corruptions"]) == {"gaussian_noise", "gaussian_blur", "contrast", "jpeg"}
        assert json.loads(ckpt.args["job"])["method"] == meta["method"]
        assert meta["retrain"]["nesterov"] is False and meta["retrain"]["epochs_in_all"] == 1
    # each model retrains with its own seed (independent draws of retraining noise), the same on every run
    seeds = {mid: read_meta(run_dir / "models" / mid)["seed"] for mid in ("unstructured-global-oneshot-r0.40",
                                                                          "lrp-oneshot-r0.40")}
    assert seeds == {mid: retrain_seed(0, mid) for mid in seeds} and len(set(seeds.values())) == 2
    # a rerun reuses finished models (same job fingerprint, unchanged checkpoint)
    before = (run_dir / "models" / "lrp-oneshot-r0.40" / "model.pt").stat().st_mtime_ns
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (run_dir / "models" / "lrp-oneshot-r0.40" / "model.pt").stat().st_mtime_ns == before
    # the corruption noise is drawn per evaluation batch: another batch size measures robustness again,
    # on the same model
    robust = read_meta(run_dir / "models" / "lrp-oneshot-r0.40")["robustness"]["fingerprint"]
    assert CliRunner().invoke(main, [*args, "--set", "data.eval_batch_size=7"]).exit_code == 0
    assert (run_dir / "models" / "lrp-oneshot-r0.40" / "model.pt").stat().st_mtime_ns == before
    assert read_meta(run_dir / "models" / "lrp-oneshot-r0.40")["robustness"]["fingerprint"] != robust


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "shrink"], "'shrink' is not one of 'unstructured-local'"),
    (["--rate", "1.5"], "prune.rates"),
    (["--exclude", "conv9"], "layer 'conv9' does not exist; valid layers: ['conv1.conv'"),
    (["--exclude", "conv1", "--exclude", "conv2", "--exclude", "conv3", "--exclude", "inception3a",
      "--exclude", "inception3b", "--exclude", "inception4a", "--exclude", "inception4b", "--exclude", "inception5a",
      "--exclude", "fc"], "leaves no layer to prune"),
])
def test_prune_command_rejects_bad_input_with_the_valid_choices(trained_base, extra, fragment):
    run_dir, common = trained_base
    result = CliRunner().invoke(main, ["prune", *extra, *common])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_evaluate_command_reports_robustness_against_a_parent(trained_base, tiny_data):
    run_dir, _ = trained_base
    base = str(run_dir / "models" / "base")
    args = ["evaluate", base, "--data", str(tiny_data), "--image-size", "32", "--device", "cpu", "--parent", base,
            "--corruption", "contrast", "--severity", "2", "--max-images", "20"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    robust = json.loads(result.stdout)["robustness"]
    assert robust["noise_similarity"]["agreement"] == [1.0] * 15  # a model always agrees with itself
    assert robust["corruptions"].keys() == {"contrast"} and robust["corruptions"]["contrast"].keys() == {"2"}
    assert robust["n"] == 20
    bad = CliRunner().invoke(main, args[:-6] + ["--corruption", "fog"])
    assert bad.exit_code == 2 and "'fog' is not one of 'gaussian_noise'" in bad.output


def test_training_saves_the_imp_rewind_point(trained_base):
    run_dir, _ = trained_base  # trained with the default prune.imp_rewind_epoch = 1 and 1 epoch
    base = run_dir / "models" / "base"
    saved = torch.load(base / "rewind.pt", weights_only=True)
    assert saved["epoch"] == 1 and read_meta(base)["rewind_epoch"] == 1
    final = load_checkpoint(base).model.state_dict()  # epoch 1 is past the end: the trained weights
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in final.items())


def test_rewind_point_at_epoch_zero_is_the_initialization(tiny_data, tmp_path):
    args = ["train", "--epochs", "1", "--rewind-epoch", "0", "--set", f'study.output_dir="{tmp_path}"',
            "--set", "data.image_size=32", "--set", "study.progress=false", "--set", 'data.source="folder"',
            "--set", f'data.path="{tiny_data}"', "--device", "cpu", "--set", "study.seed=7"]
    assert CliRunner().invoke(main, args).exit_code == 0
    saved = torch.load(tmp_path / "default" / "models" / "base" / "rewind.pt", weights_only=True)["state_dict"]
    torch.manual_seed(7)
    init = create_model("inception-small", num_classes=10).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in init.items())


def test_batchnorm_recalibration_re_estimates_the_statistics_of_the_pruned_network(tiny_data):
    """After pruning, every BatchNorm's running mean becomes the average of its batch means on the pruned network."""
    import copy

    from pruning.data.folders import make_loader
    from pruning.masks import apply_masks
    from pruning.models import create_model
    from pruning.schedule import PruneJob, recalibrate_batchnorm

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=10, width=0.5).eval()
    train = make_loader(tiny_data, "train", image_size=32, batch_size=40, train=False)
    job = PruneJob(method="structured", rate=0.5, exclude=("conv1",))
    masks = job.method_instance(32).masks(model, 0.5, job.exclude)
    apply_masks(model, masks)
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("running_mean", "running_var",
                                                                                       "num_batches_tracked"))}
    reference = copy.deepcopy(model).train()      # the obvious way: batch means of every BatchNorm input
    norms = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    means = {n: [] for n in norms}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: means[n].append(i[0].mean((0, 2, 3))))
             for n, m in norms.items()]
    with torch.no_grad():
        for b in train:
            reference(b.images)
    for h in hooks:
        h.remove()
    used = recalibrate_batchnorm(model, train, batches=100)
    assert used == len(train) and not model.training                 # flags restored
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.testing.assert_close(module.running_mean, torch.stack(means[name]).mean(0), rtol=1e-4, atol=1e-5)
            assert module.momentum == 0.1                             # momentum restored
    for k, v in weights.items():                                      # weights (and so the masks) untouched
        assert torch.equal(model.state_dict()[k], v), k


def test_every_evaluation_of_a_job_runs_at_the_retraining_precision(loaders):
    """``before`` (and the parent's top-1 in the workflow) at the precision retraining validates at, so that
    before, after and parent compare like with like (bf16 on a GPU; forced here on the CPU)."""
    from pruning.masks import apply_masks
    from pruning.training import evaluate

    job = PruneJob("structured", 0.5, exclude=STEM)
    bf16 = TrainSettings(epochs=0, amp="bf16")
    out = prune_and_retrain(_model(4), job, settings=bf16, train_loader=loaders[0], val_loader=loaders[1],
                            progress=False, input_size=32)
    pruned = _model(4)
    apply_masks(pruned, out.masks)
    step = out.steps[0]
    assert step["before"] == evaluate(pruned, loaders[1], amp=torch.bfloat16)
    assert step["before"]["loss"] != evaluate(pruned, loaders[1])["loss"]       # the precision did matter


def test_every_rank_prunes_with_rank_0s_masks(loaders):
    """Ranks whose scores differ (here: different weights) still prune the same weights: rank 0's."""
    from thread_ranks import ThreadRanks

    job = PruneJob("unstructured-global", 0.5, exclude=STEM)
    outs, errors = ThreadRanks(2).run(lambda ctx: prune_and_retrain(
        _model(10 + ctx.rank), job, settings=TrainSettings(epochs=0), train_loader=loaders[0],
        val_loader=loaders[1], ctx=ctx, progress=False, input_size=32))
    assert errors == [None, None]
    own = create_method("unstructured-global").masks(_model(11), 0.5, exclude=STEM)      # rank 1's own choice
    assert any(not torch.equal(own[k], outs[0].masks[k]) for k in own)
    assert all(torch.equal(outs[0].masks[k], outs[1].masks[k]) for k in outs[0].masks)


def test_robustness_reports_are_refreshed_when_the_noise_moves_to_another_device():
    """The corruption noise comes from a generator on the device (CPU and CUDA draw different noise for
    one seed): a study resumed on a GPU measures its models again there, so all share one noise; on the
    CPU the fingerprint is what it always was, and table-only settings never enter it."""
    import dataclasses

    from pruning.workflows import _robustness_fingerprint
    from sparsight.config import load_study

    cfg = load_study()
    cpu = _robustness_fingerprint(cfg, "abc", torch.device("cpu"))
    assert cpu == _robustness_fingerprint(cfg, "abc", "cpu")
    assert _robustness_fingerprint(cfg, "abc", torch.device("cuda", 0)) != cpu
    assert _robustness_fingerprint(cfg, "abc", "cuda:1") == _robustness_fingerprint(cfg, "abc", "cuda")
    table_only = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, prune_potential_delta=0.02))
    assert _robustness_fingerprint(table_only, "abc", "cpu") == cpu
    noisier = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, noise_eps_max=0.9))
    assert _robustness_fingerprint(noisier, "abc", "cpu") != cpu


def test_the_retrained_control_prunes_nothing_and_retrains_as_a_oneshot_model_does(loaders, reference):
    """``prune.control``: the control keeps every weight, and its retraining equals a one-shot job's from the same
    start with nothing pruned (reference: plain retraining of the same model with the same settings); a rate
    above 0 is a clear error, for the job and for the method."""
    from pruning.training import Trainer

    job = PruneJob("control", 0.0, exclude=STEM)
    assert job.model_id == "control-oneshot-r0.00"
    out = prune_and_retrain(_model(), job, settings=SETTINGS, train_loader=loaders[0], val_loader=loaders[1],
                            reference=reference, progress=False, input_size=32)
    assert out.masks and all(bool(m.all()) for m in out.masks.values())
    assert measure_sparsity(out.model)["total"] == 0.0
    plain = Trainer(_model(), SETTINGS, progress=False)
    plain.fit(loaders[0], loaders[1])
    for key, value in plain.model.state_dict().items():
        assert torch.allclose(value, out.model.state_dict()[key], atol=1e-6), key
    with pytest.raises(PruningError, match=r"method 'control' prunes nothing, so its rate is 0, not 0.5"):
        PruneJob("control", 0.5)
    with pytest.raises(PruningError, match="prunes nothing"):
        create_method("control").masks(_model(), 0.3)


def test_training_resumed_past_the_rewind_epoch_keeps_the_imp_rewind_point(tiny_data, tmp_path, monkeypatch):
    """A base training interrupted after the rewind epoch and run again resumes; its ``rewind.pt`` is the one
    the interrupted run saved at that epoch, as an uninterrupted run's (not the final weights under the rewind
    epoch's name, which would hand every IMP model other weights), and ``metrics.jsonl`` lists each epoch once.
    With the rewind point lost, the run trains again from the start and gets the same result."""
    from pruning.training import StopTraining
    from pruning.training.engine import Trainer

    def train(name):
        args = ["train", "--epochs", "3", "--rewind-epoch", "1", "--set", f'study.output_dir="{tmp_path}"',
                "--set", f'study.name="{name}"', "--set", "data.image_size=32", "--set", "study.progress=false",
                "--set", 'data.source="folder"', "--set", f'data.path="{tiny_data}"', "--device", "cpu"]
        return CliRunner().invoke(main, args)

    def weights(name):
        base = tmp_path / name / "models" / "base"
        return (torch.load(base / "rewind.pt", weights_only=True), load_checkpoint(base).model.state_dict(),
                [json.loads(line)["epoch"] for line in (base / "metrics.jsonl").read_text().splitlines()])

    assert train("whole").exit_code == 0
    whole_rewind, whole_final, _ = weights("whole")
    epoch_of = Trainer._train_epoch

    def interrupted(self, net, loader, opt, sched, epoch):
        if epoch == 2:
            raise StopTraining("interrupted")
        return epoch_of(self, net, loader, opt, sched, epoch)

    for name, lose_rewind in (("resumed", False), ("lost", True)):
        with monkeypatch.context() as m:
            m.setattr(Trainer, "_train_epoch", interrupted)
            assert train(name).exit_code != 0
        base = tmp_path / name / "models" / "base"
        assert torch.load(base / "train_state.pt", weights_only=True)["epoch"] == 1
        if lose_rewind:
            (base / "rewind.pt").unlink()
        assert train(name).exit_code == 0
        rewind, final, epochs = weights(name)
        assert rewind["epoch"] == 1 and epochs == [0, 1, 2]
        assert all(torch.equal(rewind["state_dict"][k], v) for k, v in whole_rewind["state_dict"].items())
        assert all(torch.equal(final[k], v) for k, v in whole_final.items())
        assert not any(torch.equal(rewind["state_dict"][k], final[k]) for k in final if k.endswith("conv.weight"))


def test_the_same_training_in_two_study_folders_writes_the_same_checkpoint_bytes(tiny_data, tmp_path):
    """Two studies that train alike on data inside their own folders write byte-identical checkpoints (the data
    is named relative to the study), so their checkpoint hashes, and every fingerprint built on them, agree."""
    import shutil

    shas = []
    for name in ("first", "second"):
        data = tmp_path / name / "data"
        shutil.copytree(tiny_data, data)
        args = ["train", "--epochs", "1", "--set", f'study.output_dir="{tmp_path}"', "--set", f'study.name="{name}"',
                "--set", "data.image_size=32", "--set", "study.progress=false", "--set", 'data.source="folder"',
                "--set", f'data.path="{data}"', "--device", "cpu"]
        assert CliRunner().invoke(main, args).exit_code == 0
        shas.append(read_meta(tmp_path / name / "models" / "base")["checkpoint_sha256"])
    assert shas[0] == shas[1]
    assert load_checkpoint(tmp_path / "first" / "models" / "base").args["data"] == "<study>/data"


def test_retrained_copies_are_jobs_of_their_own_with_their_own_ids_and_seeds():
    """prune.copies = 3: every job and the control three times, ids -c2/-c3 after the first, each retrained with
    its own seed; copies = 1 keeps the ids a study had."""
    from pruning.stages import prune_jobs
    from sparsight.config import load_study

    one = prune_jobs(load_study(overrides=["prune.methods=[\"structured\"]", "prune.rates=[0.5]",
                                           "prune.schedules=[\"oneshot\"]"]))
    assert [j.model_id for j in one] == ["control-oneshot-r0.00", "structured-oneshot-r0.50"]
    cfg = load_study(overrides=["prune.methods=[\"structured\"]", "prune.rates=[0.5]", "prune.schedules=[\"oneshot\"]",
                                "prune.copies=3"])
    ids = [j.model_id for j in prune_jobs(cfg)]
    assert ids == ["control-oneshot-r0.00", "control-oneshot-r0.00-c2", "control-oneshot-r0.00-c3",
                   "structured-oneshot-r0.50", "structured-oneshot-r0.50-c2", "structured-oneshot-r0.50-c3"]
    assert len({retrain_seed(cfg.study.seed, i) for i in ids}) == 6
    with pytest.raises(PruningError, match="copies count from 1"):
        PruneJob(method="structured", rate=0.5, copy=0)
