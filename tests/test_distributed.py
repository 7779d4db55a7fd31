"""The DDP code path under torchrun: one process must train exactly like the plain run."""
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from sparsight.cli import main


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


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["googlenet", "resnet50"])
def test_torchrun_on_cuda_with_bf16_and_channels_last(tiny_data, tmp_path, arch):
    args = ["train", "--data", str(tiny_data), "--arch", arch, "--epochs", "1", "--out", str(tmp_path / arch),
            "--device", "cuda", "--set", "data.image_size=64", "--set", "study.progress=false",
            "--set", 'train.amp="bf16"', "--set", 'train.channels_last="on"', "--set", "data.batch_size=32"]
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / arch / "model.pt").is_file()
