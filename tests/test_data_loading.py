import shutil

import pytest
import torch

from pruning.data.folders import (CorruptImageError, DataLayoutError, FolderLoader, ImageFolderDataset,
                                  MemoryLoader, build_transform, make_loader, shift_flip)
from sparsight.errors import user_error_message


@pytest.fixture
def data_with_corrupt(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data / "train", root / "train")
    shutil.copytree(tiny_data / "val", root / "val")
    bad = root / "train" / "circle" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root, bad


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_corrupt_image_fails_with_its_name(data_with_corrupt, cache):
    root, bad = data_with_corrupt
    with pytest.raises(CorruptImageError, match="broken.png"):
        loader = make_loader(root, "train", image_size=32, batch_size=400, train=False, cache=cache,
                             on_corrupt="error", num_workers=0)
        for _ in loader:
            pass


def test_a_corrupt_image_in_a_loader_worker_comes_to_the_user_as_one_line_naming_it(data_with_corrupt):
    root, bad = data_with_corrupt
    loader = make_loader(root, "train", image_size=32, batch_size=400, train=False, cache="none",
                         on_corrupt="error", num_workers=1)
    with pytest.raises(CorruptImageError) as caught:
        for _ in loader:
            pass
    assert "Original Traceback" in str(caught.value)         # the worker's re-raise, as torch builds it
    message = user_error_message(caught.value)
    assert message == f"cannot decode image {bad}: cannot identify image file {str(bad)!r}"


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_corrupt_image_is_skipped_named_and_counted(data_with_corrupt, cache):
    root, bad = data_with_corrupt
    with pytest.warns(UserWarning, match="broken.png"):
        loader = make_loader(root, "train", image_size=32, batch_size=400, train=False, cache=cache,
                             on_corrupt="skip", num_workers=0)
        batches = list(loader)
    assert sum(b.skipped for b in batches) == 1
    assert sum(len(b.targets) for b in batches) == 160


def test_missing_split_lists_what_is_there(tmp_path):
    (tmp_path / "training").mkdir()
    with pytest.raises(DataLayoutError, match=r"no val/ folder \(found: \['training'\]\)"):
        make_loader(tmp_path, "val", image_size=32, batch_size=4, train=False)
    with pytest.raises(DataLayoutError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_memory_and_folder_loaders_agree_on_validation(tiny_data):
    mem = make_loader(tiny_data, "val", image_size=32, batch_size=16, train=False, cache="memory")
    disk = make_loader(tiny_data, "val", image_size=32, batch_size=16, train=False, cache="none", num_workers=0)
    assert isinstance(mem, MemoryLoader) and isinstance(disk, FolderLoader)
    xm = torch.cat([b.images for b in mem])
    xd = torch.cat([b.images for b in disk])
    assert torch.allclose(xm, xd, atol=1e-5)
    assert torch.equal(torch.cat([b.targets for b in mem]), torch.cat([b.targets for b in disk]))


def _shift_flip_reference(x, generator, pad_fraction=0.125):
    n, _, h, w = x.shape
    pad = max(1, int(round(h * pad_fraction)))
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    out = []
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_shift_flip_matches_a_per_image_reference():
    x = torch.rand(7, 3, 16, 16)
    fast = shift_flip(x, torch.Generator().manual_seed(5))
    slow = _shift_flip_reference(x, torch.Generator().manual_seed(5))
    assert torch.equal(fast, slow)


def test_memory_loader_shards_cover_every_image_once_per_epoch():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    targets = torch.arange(10)
    seen = []
    for rank in range(3):
        loader = MemoryLoader(images, targets, 1, train=True, seed=1, augment="none", rank=rank, world_size=3)
        loader.set_epoch(2)
        seen += [int(b.targets) for b in loader]
    assert set(seen) == set(range(10)) and len(seen) == 12  # padded to a multiple of the world size


def test_epoch_order_is_a_function_of_seed_and_epoch():
    images = torch.zeros(20, 3, 4, 4, dtype=torch.uint8)
    a = MemoryLoader(images, torch.arange(20), 5, train=True, seed=1, augment="none")
    b = MemoryLoader(images, torch.arange(20), 5, train=True, seed=1, augment="none")
    a.set_epoch(3)
    first = [b_.targets.tolist() for b_ in a]
    for e in (0, 1, 3):
        b.set_epoch(e)
        order = [x.targets.tolist() for x in b]
    assert order == first
    a.set_epoch(4)
    assert [x.targets.tolist() for x in a] != first


def test_imagenet_transforms_have_the_standard_shape():
    from PIL import Image
    img = Image.new("RGB", (300, 260), (10, 20, 30))
    assert build_transform(224, train=True, augment="imagenet")(img).shape == (3, 224, 224)
    assert build_transform(224, train=False)(img).shape == (3, 224, 224)


def test_batches_take_the_data_loaders_pinning(monkeypatch):
    """A DataLoader with ``pin_memory=True`` pins what a batch's ``pin_memory`` returns; a batch without
    one would reach the GPU from pageable memory, and its ``non_blocking`` copy would block."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from pruning.data.common import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    batch = Batch(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), skipped=1)
    out = pin_memory(batch)
    assert isinstance(out, Batch) and out.skipped == 1 and len(pinned) == 2
    assert torch.equal(out.images, batch.images) and out.images is not batch.images


@pytest.mark.cuda
def test_folder_loader_for_a_gpu_gives_pinned_batches(tiny_data):
    loader = make_loader(tiny_data, "val", image_size=32, batch_size=16, train=False, cache="none",
                         decode="cpu", num_workers=1, device="cuda")
    batch = next(iter(loader))
    assert isinstance(loader, FolderLoader) and batch.images.is_pinned() and batch.targets.is_pinned()


def _copy_data(tiny_data, root):
    shutil.copytree(tiny_data / "train", root / "train")
    shutil.copytree(tiny_data / "val", root / "val")
    return root


def test_splits_with_different_class_folders_stop_before_any_label_is_read(tiny_data, tmp_path):
    """val/ without one of train/'s classes would give every later val class the label of the one before it
    (a class's label is its place among the folders): every access to either split stops, naming the class."""
    from pruning.data.folders import folder_digest, split_dir

    root = _copy_data(tiny_data, tmp_path / "data")
    missing = sorted(p.name for p in (root / "val").iterdir())[1]
    shutil.rmtree(root / "val" / missing)
    for split in ("train", "val"):
        with pytest.raises(DataLayoutError, match=rf"val/ lacks 1 class\(es\) train/ has: \['{missing}'\]"):
            split_dir(root, split)
    with pytest.raises(DataLayoutError, match="same class folders"):
        make_loader(root, "val", image_size=32, batch_size=4, train=False)
    shutil.copytree(tiny_data / "val" / missing, root / "val" / missing)
    (root / "val" / "zebra").mkdir()
    with pytest.raises(DataLayoutError, match=r"val/ has 1 class\(es\) train/ lacks: \['zebra'\]"):
        split_dir(root, "val")
    (root / "val" / "zebra").rmdir()
    assert split_dir(root, "val") == root / "val"

    before = folder_digest(root)                     # what a study's data stage fingerprints
    assert folder_digest(_copy_data(tiny_data, tmp_path / "copy")) == before          # contents, not the place
    extra = root / "val" / missing / "new.png"
    shutil.copy(next((root / "val" / missing).glob("*.png")), extra)
    assert folder_digest(root) != before
    extra.unlink()
    (root / "val" / missing / "notes.txt").write_text("not an image")
    assert folder_digest(root) == before             # only images count


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_greyscale_is_scaled_to_8_bits_not_clipped_white(tmp_path, mode):
    """A 16-bit PNG (or a float TIFF) decodes to the same greys as its 8-bit rendering (value × 255 / 65535),
    not to Pillow's plain conversion, which clips every value above 255 to white."""
    import numpy as np
    from PIL import Image

    from pruning.data.common import open_image

    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64)
    if mode == "F":
        path, pixels = tmp_path / "ramp.tif", (ramp / 65535).astype(np.float32)
    else:
        path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")
        pixels = ramp.astype(np.uint16 if mode == "I;16" else np.int32)
    image = Image.fromarray(pixels)
    image.save(path)
    with Image.open(path) as reread:
        assert reread.mode == mode
    decoded = np.asarray(open_image(path))
    expected = np.rint(ramp / 65535 * 255)
    assert decoded.shape == (48, 64, 3) and np.abs(decoded[..., 0] - expected).max() <= 1
    assert (decoded[..., 0] == decoded[..., 2]).all()
    assert (decoded == 255).mean() < 0.02
