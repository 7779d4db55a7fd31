"""The DDP code path under torchrun: one process must train exactly like the plain run."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from pruning.training.distributed import DeviceUnavailableError, resolve_device
from sparsight.cli import main
from sparsight.errors import user_error_message


def _train_args(data, out, device):
    return ["train", "--data", str(data), "--arch", "observer-small", "--epochs", "1", "--out", str(out),
            "--device", device, "--set", "data.image_size=32", "--set", "study.progress=false",
            "--set", "train.channels_last=\"off\""]


def _torchrun(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "sparsight",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_single_process_matches_plain_training(tiny_data, tmp_path):
    plain = CliRunner().invoke(main, _train_args(tiny_data, tmp_path / "plain", "cpu"))
    assert plain.exit_code == 0, plain.output
    proc = _torchrun(_train_args(tiny_data, tmp_path / "ddp", "cpu"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = torch.load(tmp_path / "plain" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    import json
    plain_meta, ddp_meta = (json.loads((tmp_path / run / "meta.json").read_text()) for run in ("plain", "ddp"))
    from sparsight.config import load_study
    assert plain_meta["batch"] == ddp_meta["batch"] == {"per_process": load_study().data.batch_size, "processes": 1}


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["googlenet", "resnet50"])
def test_torchrun_on_cuda_with_bf16_and_channels_last(tiny_data, tmp_path, arch):
    args = ["train", "--data", str(tiny_data), "--arch", arch, "--epochs", "1", "--out", str(tmp_path / arch),
            "--device", "cuda", "--set", "data.image_size=64", "--set", "study.progress=false",
            "--set", 'train.amp="bf16"', "--set", 'train.channels_last="on"', "--set", "data.batch_size=32"]
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / arch / "model.pt").is_file()


def _torchrun_n(n, args):
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "sparsight",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_stimuli_sharded_over_two_gloo_processes_equal_the_single_process_run(tiny_data, tmp_path):
    """Two ranks mine shares of the images and render shares of the units; the bank is the plain run's."""
    import pandas as pd

    from stimuli.mining import MiningResult

    def common(name):
        return ["--set", f'study.output_dir="{tmp_path}"', "--set", f'study.name="{name}"', "--set",
                "data.image_size=32", "--set", "study.progress=false", "--set", 'data.source="folder"',
                "--set", f'data.path="{tiny_data}"', "--set", "data.eval_batch_size=16", "--device", "cpu"]

    stim = ["--model", "base", "--unit", "inception3a:0-3", "--unit", "inception4a:0-4", "--set", "stimuli.n_tasks=2",
            "--set", "stimuli.n_references=2", "--set", "stimuli.fv_steps=4", "--set", "stimuli.fv_batch_units=2"]
    trained = CliRunner().invoke(main, ["train", "--epochs", "1", *common("plain")])
    assert trained.exit_code == 0, trained.output
    (tmp_path / "sharded" / "models").mkdir(parents=True)
    shutil.copytree(tmp_path / "plain" / "models" / "base", tmp_path / "sharded" / "models" / "base")

    plain = CliRunner().invoke(main, ["stimuli", *stim, *common("plain")])
    assert plain.exit_code == 0, plain.output
    proc = _torchrun_n(2, ["stimuli", *stim, *common("sharded")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "sharded" / "stimuli" / "mining").glob("base.*.state.rank1-of-2.pt"))

    key = ["model_id", "kind", "layer", "unit", "task", "role", "rank"]
    a, b = (pd.read_parquet(tmp_path / run / "stimuli" / "manifest.parquet").sort_values(key, ignore_index=True)
            for run in ("plain", "sharded"))
    assert len(a) == len(b) and set(a.kind) == {"natural", "synthetic"} and a.unit.nunique() == 5
    pd.testing.assert_frame_equal(a.drop(columns="activation"), b.drop(columns="activation"))
    assert (a.activation - b.activation).abs().max() <= 1e-5
    images = sorted(p.name for p in (tmp_path / "plain" / "stimuli" / "images").iterdir())
    assert images == sorted(p.name for p in (tmp_path / "sharded" / "stimuli" / "images").iterdir())
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "plain" / "stimuli" / "units.csv"),
                                  pd.read_csv(tmp_path / "sharded" / "stimuli" / "units.csv"))
    ma, mb = (MiningResult.load(tmp_path / run / "stimuli" / "mining" / "base.mining.pt")
              for run in ("plain", "sharded"))
    assert ma.n_images == mb.n_images == 60
    for layer in ma.layers:
        assert torch.equal(ma.layers[layer].top_indices, mb.layers[layer].top_indices)
        assert torch.equal(ma.layers[layer].bottom_values, mb.layers[layer].bottom_values)
        assert torch.allclose(ma.layers[layer].std, mb.layers[layer].std, rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["none", "memory"])
def test_a_batch_all_corrupt_on_one_process_is_skipped_by_every_process(tiny_data, tmp_path, cache):
    """Skipping it on one process alone left the other waiting in the gradient all-reduce for ever.  Every
    corrupt image is counted once: streamed, by the process that read it; decoded into memory (where each
    process decodes the whole set), by rank 0 alone."""
    import json

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    train = sorted((data / "train").rglob("*.png"))
    for path in train[::8]:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    args = [*_train_args(data, tmp_path / "out", "cpu"), "--set", f'data.cache="{cache}"', "--set",
            "data.batch_size=1", "--set", "data.num_workers=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sparsight",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["skipped"] == len(train[::8])
    if cache == "none":
        assert epoch["dropped"] > 0      # the case happened: some step had an empty batch on one process only
    assert epoch["images"] + epoch["skipped"] + epoch["dropped"] == len(train)


TINY_STUDY = ["--profile", "quick", "--set", "study.progress=false", "--set", "data.train_per_class=20",
              "--set", "data.val_per_class=15", "--set", "data.image_size=32", "--set",
              'prune.methods=["structured","lrp"]', "--set", "prune.rates=[0.5]", "--set",
              'prune.schedules=["oneshot","iterative"]', "--set", "train.epochs=1", "--set", "observer.epochs=1",
              "--set", "prune.control=false", "--device", "cpu"]


@pytest.mark.slow
def test_whole_study_runs_under_torchrun_with_two_gloo_processes(tmp_path):
    """Every stage under torchrun: DDP training, sharded stimuli, rank-0 stages behind barriers; one log."""
    import pandas as pd

    from sparsight.cli import pipeline_stages

    args = ["run", *TINY_STUDY, "--set", f'study.output_dir="{tmp_path}"']
    proc = _torchrun_n(2, args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "quick"
    for stage in pipeline_stages():
        assert proc.stdout.count(f"[{stage.name}] done in") == 1, stage.name     # rank 0 logs, once
    assert proc.stdout.count("study directory:") == 1
    models = pd.read_csv(run_dir / "evaluation.csv")
    assert len(models) == 6 and set(models.method.dropna()) == {"structured", "lrp"}
    manifest = pd.read_parquet(run_dir / "stimuli" / "manifest.parquet")
    assert set(manifest.model_id) == set(models.model_id) - {"observer"}
    assert list((run_dir / "stimuli" / "mining").glob("*.rank1-of-2.pt"))            # rank 1 did mine
    assert (run_dir / "report" / "index.html").is_file()
    again = _torchrun_n(2, args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date, skipped") == len(pipeline_stages())
    # forcing a stage that only rank 0 writes (MIS): both ranks finish, the unchanged stages after it are
    # skipped and the report is left as it was (the runner's rank-0 decisions: also tests/test_kernel.py)
    report = (run_dir / "report" / "index.html").stat().st_mtime_ns
    forced = _torchrun_n(2, [*args, "--force", "mis"])
    assert forced.returncode == 0, forced.stdout[-2000:] + forced.stderr[-3000:]
    assert forced.stdout.count("[mis] done in") == 1
    assert forced.stdout.count("up to date, skipped") == len(pipeline_stages()) - 1
    assert (run_dir / "report" / "index.html").stat().st_mtime_ns == report


@pytest.mark.parametrize("preference, expected",
                         [("cpu", "cpu"), ("auto", "cuda:0" if torch.cuda.is_available() else "cpu")])
def test_resolve_device_takes_the_devices_a_study_may_name(preference, expected):
    assert resolve_device(preference) == torch.device(expected)


@pytest.mark.parametrize("preference", ["bogus", "cuda:x", "gpu", ""])
def test_resolve_device_explains_a_malformed_name(preference):
    with pytest.raises(ValueError, match=r"unknown device .*; expected auto \| cpu \| cuda \| cuda:N \| mps"):
        resolve_device(preference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_an_error_the_user_can_fix():
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available; use 'cpu' or 'auto'") as caught:
        resolve_device("cuda:1")
    assert user_error_message(caught.value).startswith("device 'cuda:1' requested")
