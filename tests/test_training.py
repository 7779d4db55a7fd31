import json

import pytest
import torch

from pruning.data.folders import make_loader
from pruning.models import create_model
from pruning.training import StopTraining, Trainer, TrainSettings, evaluate
from pruning.training.engine import classification_loss


def _loaders(root):
    train = make_loader(root, "train", image_size=32, batch_size=16, train=True, seed=0)
    val = make_loader(root, "val", image_size=32, batch_size=32, train=False)
    return train, val


def _model():
    torch.manual_seed(0)
    return create_model("inception-small", num_classes=10, width=0.5)


SETTINGS = TrainSettings(epochs=3, lr=0.05, scheduler="onecycle", seed=4, channels_last="off")


def test_resume_after_interrupted_epoch_matches_uninterrupted_run(tiny_data, tmp_path):
    train, val = _loaders(tiny_data)
    full = Trainer(_model(), SETTINGS, out_dir=tmp_path / "full", progress=False)
    full_history = full.fit(train, val)

    def crash(trainer, epoch, batch):
        if epoch == 1 and batch == 3:
            raise StopTraining("simulated interruption")

    first = Trainer(_model(), SETTINGS, out_dir=tmp_path / "resumed", progress=False, batch_hooks=[crash])
    with pytest.raises(StopTraining):
        first.fit(train, val)
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 0  # only the first epoch finished

    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = Trainer(create_model("inception-small", num_classes=10, width=0.5), SETTINGS,
                      out_dir=tmp_path / "resumed", progress=False)
    history = resumed.fit(train, val)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history[-1]["val"] == full_history[-1]["val"]
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1, 2]


def test_changed_settings_do_not_resume_silently(tiny_data, tmp_path):
    train, val = _loaders(tiny_data)
    Trainer(_model(), TrainSettings(epochs=1, lr=0.05, channels_last="off"), out_dir=tmp_path,
            progress=False).fit(train)
    with pytest.warns(UserWarning, match="other training settings; starting from scratch"):
        history = Trainer(_model(), TrainSettings(epochs=1, lr=0.01, channels_last="off"), out_dir=tmp_path,
                          progress=False).fit(train)
    assert len(history) == 1


def test_training_fits_the_tiny_training_set(tiny_data):
    train, _ = _loaders(tiny_data)
    seen = make_loader(tiny_data, "train", image_size=32, batch_size=64, train=False)
    model = _model()
    before = evaluate(model, seen)
    Trainer(model, TrainSettings(epochs=10, lr=0.05, seed=1), progress=False).fit(train)
    after = evaluate(model, seen)
    assert after["loss"] < before["loss"] - 0.3
    assert after["top1"] > 0.3  # chance is 0.1


def test_evaluate_matches_a_direct_computation(tiny_data):
    _, val = _loaders(tiny_data)
    model = _model().eval()
    result = evaluate(model, val)
    xs = torch.cat([b.images for b in val])
    ys = torch.cat([b.targets for b in val])
    with torch.no_grad():
        logits = model(xs)
    top5 = logits.topk(5, 1).indices
    assert result["n"] == len(ys) == 60
    assert result["top1"] == pytest.approx(float((logits.argmax(1) == ys).float().mean()))
    assert result["top5"] == pytest.approx(float((top5 == ys[:, None]).any(1).float().mean()))
    assert result["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, ys)), rel=1e-5)


@pytest.mark.slow
def test_googlenet_aux_heads_add_weighted_losses():
    torch.manual_seed(0)
    model = create_model("googlenet", num_classes=4, aux_logits=True).train()
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([1, 3])
    out = model(x)
    loss, logits = classification_loss(out, y)
    ce = torch.nn.functional.cross_entropy
    expected = ce(out.logits, y) + 0.3 * (ce(out.aux_logits1, y) + ce(out.aux_logits2, y))
    assert torch.allclose(loss, expected) and logits is out.logits


@pytest.mark.parametrize("scheduler", ["none", "cosine", "onecycle", "exponential", "step"])
def test_every_scheduler_runs_and_reports_lr(tiny_data, scheduler):
    train, _ = _loaders(tiny_data)
    s = TrainSettings(epochs=2, lr=0.05, scheduler=scheduler, warmup_epochs=0.5, gamma=0.5, step_size=1,
                      optimizer="sgd")
    history = Trainer(_model(), s, progress=False).fit(train)
    lrs = [h["lr"] for h in history]
    if scheduler == "none":
        assert lrs == [0.05, 0.05]
    elif scheduler in ("exponential", "step"):
        assert lrs == pytest.approx([0.05, 0.025])  # the rate used in each epoch
    else:
        assert lrs[1] < lrs[0] or lrs[1] < 0.05


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["googlenet", "resnet50"])
def test_cuda_bf16_channels_last_training_steps(arch):
    from pruning.data.folders import Batch
    from pruning.training import DistContext

    torch.manual_seed(0)
    model = create_model(arch, num_classes=10)
    batches = [Batch(torch.randn(16, 3, 224, 224), torch.randint(0, 10, (16,))) for _ in range(3)]

    class Loader(list):
        def set_epoch(self, epoch):
            pass

    ctx = DistContext(device=torch.device("cuda"))
    trainer = Trainer(model, TrainSettings(epochs=1, lr=0.01, amp="bf16", channels_last="on", scheduler="none"),
                      ctx=ctx, progress=False)
    history = trainer.fit(Loader(batches))
    assert history[0]["images"] == 48 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    assert next(trainer.model.parameters()).is_cuda


def test_top5_is_left_out_where_it_cannot_fail():
    """With five classes or fewer every label is among the top five: top-5 is None there, not a perfect 1.0."""
    from pruning.data.common import Batch

    torch.manual_seed(0)
    for classes, defined in ((3, False), (5, False), (6, True)):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, classes))
        batches = [Batch(torch.randn(8, 3, 2, 2), torch.randint(0, min(classes, 3), (8,)))]
        result = evaluate(model, batches)
        assert (result["top5"] is not None) is defined and 0 <= result["top1"] <= 1
