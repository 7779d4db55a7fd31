"""The device JPEG path (pruning.data.jpeg) against the PIL DataLoader path it replaces on a GPU.

On the CPU ``decode_jpeg`` runs libjpeg-turbo, so these tests check the batching, geometry,
augmentation sampling, fallbacks and corrupt-file handling of the same code a GPU runs; the
``cuda`` test checks nvJPEG against the CPU decoder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from pruning.data.folders import (IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, FolderLoader, ImageFolderDataset,
                                  build_transform, make_loader)
from pruning.data.jpeg import (DeviceDecoder, DeviceTransform, JpegFolderLoader, adobe_transform, decoded_spans,
                               device_decodable, jpeg_frame, sample_resized_crop)

LEVEL = 1 / 255 / min(IMAGENET_STD)  # one 8-bit grey level in normalized units


def _photo(rng, h, w):
    """A smooth random image with some texture (compresses like a photo, not like noise)."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def encoded_jpeg(img: Image.Image) -> bytes:
    """``img`` as PIL writes a JPEG (JFIF, YCbCr)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """train/ and val/ with 2 classes of JPEGs of varied sizes, one greyscale JPEG and one PNG."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (90, 50), (75, 75), (120, 96), (41, 130), (64, 64)]
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                _photo(rng, h, w).save(folder / f"{i}.jpg", quality=90)
        _photo(rng, 70, 52).convert("L").save(root / split / "cat" / "grey.jpg", quality=90)
        _photo(rng, 48, 66).save(root / split / "dog" / "lossless.png")
    return root


def _all(loader):
    batches = list(loader)
    return torch.cat([b.images for b in batches]), torch.cat([b.targets for b in batches])


@pytest.mark.parametrize("image_size", [32, 128])
def test_validation_batches_match_the_pil_loader(jpeg_folder, image_size):
    """Same resize rule (size/0.875 from 128 px), antialiased resize and centre crop as PIL."""
    ds = ImageFolderDataset(jpeg_folder / "val", transform=build_transform(image_size, train=False))
    ref_x, ref_y = _all(FolderLoader(ds, 5, train=False, num_workers=0))
    dev_x, dev_y = _all(JpegFolderLoader(ds, 5, train=False, image_size=image_size, num_workers=0, device="cpu"))
    assert torch.equal(ref_y, dev_y)
    assert dev_x.shape == ref_x.shape == (14, 3, image_size, image_size)
    diff = (dev_x - ref_x).abs()
    assert diff.max() <= 2 * LEVEL, diff.max() / LEVEL
    assert diff.mean() <= 0.5 * LEVEL


def test_make_loader_picks_device_decoding_only_when_asked_or_on_a_gpu(jpeg_folder):
    common = dict(image_size=32, batch_size=4, train=False, cache="none", num_workers=0)
    assert isinstance(make_loader(jpeg_folder, "val", **common), FolderLoader)
    assert isinstance(make_loader(jpeg_folder, "val", decode="device", **common), JpegFolderLoader)
    with pytest.raises(ValueError, match=r"choose from \['auto', 'cpu', 'device'\]"):
        make_loader(jpeg_folder, "val", decode="gpu", **common)


def test_resized_crop_parameters_are_drawn_as_torchvision_draws_them():
    for seed in range(40):
        h, w = [(375, 500), (500, 333), (40, 900), (900, 40)][seed % 4]
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(torch.empty(3, h, w), (0.08, 1.0), (3 / 4, 4 / 3))
        got = sample_resized_crop(h, w, torch.Generator().manual_seed(seed))
        assert got == tuple(expected)


def test_training_augmentation_matches_pil_crop_flip_and_normalization(jpeg_folder):
    path = jpeg_folder / "train" / "dog" / "3.jpg"
    pil = Image.open(path).convert("RGB")
    transform = DeviceTransform(96, train=True, augment="imagenet", device=torch.device("cpu"))
    decoded = DeviceDecoder("cpu")([torch.from_numpy(np.fromfile(path, dtype=np.uint8))], [str(path)], [True])
    flips = set()
    for seed in range(6):
        out = transform(decoded, torch.Generator().manual_seed(seed))[0]
        g = torch.Generator().manual_seed(seed)
        top, left, h, w = sample_resized_crop(pil.height, pil.width, g)
        flip = torch.rand(1, generator=g).item() < 0.5
        flips.add(flip)
        ref = TF.resized_crop(pil, top, left, h, w, [96, 96])
        ref = TF.normalize(TF.to_tensor(TF.hflip(ref) if flip else ref), IMAGENET_MEAN, IMAGENET_STD)
        assert (out - ref).abs().max() <= 3 * LEVEL + 1e-5
    assert flips == {True, False}


def test_training_epochs_are_seeded_and_shards_partition_the_data(jpeg_folder):
    ds = ImageFolderDataset(jpeg_folder / "train")

    def epoch(loader, e):
        loader.set_epoch(e)
        return _all(loader)

    a = JpegFolderLoader(ds, 4, train=True, image_size=32, num_workers=0, device="cpu", seed=5)
    b = JpegFolderLoader(ds, 4, train=True, image_size=32, num_workers=0, device="cpu", seed=5)
    xa, ya = epoch(a, 1)
    xb, yb = epoch(b, 1)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(epoch(a, 2)[0], xa)
    seen = []
    for rank in range(2):
        shard = JpegFolderLoader(ds, 1, train=False, image_size=32, num_workers=0, device="cpu", rank=rank,
                                 world_size=2)
        seen += [i for batch in shard.loader for i in batch.indices]
    assert sorted(seen) == list(range(len(ds)))


def test_corrupt_file_is_named_skipped_or_raised(jpeg_folder, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(jpeg_folder / "val", root / "val")
    bad = root / "val" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG body")
    ds = ImageFolderDataset(root / "val")
    with pytest.warns(UserWarning, match="broken.jpg"):
        batches = list(JpegFolderLoader(ds, 6, train=False, image_size=32, num_workers=0, device="cpu"))
    assert sum(b.skipped for b in batches) == 1
    assert sum(len(b.targets) for b in batches) == 14
    strict = ImageFolderDataset(root / "val", on_corrupt="error")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        list(JpegFolderLoader(strict, 6, train=False, image_size=32, num_workers=0, device="cpu"))


def test_mining_spans_cover_every_position_in_order(jpeg_folder):
    ds = ImageFolderDataset(jpeg_folder / "val")
    spans = list(decoded_spans(ds.samples, range(3, len(ds)), image_size=32, batch_size=4, device="cpu", num_workers=0))
    assert torch.equal(torch.cat([s.indices for s in spans]), torch.arange(3, len(ds)))
    assert sum(s.positions for s in spans) == len(ds) - 3


def test_mining_on_device_decoded_images_matches_the_pil_path(jpeg_folder):
    from pruning.models import create_model
    from stimuli.mining import mine

    torch.manual_seed(0)
    model = create_model("inception-small", num_classes=2)
    layers = ["inception3a", "inception4a"]
    ref = mine(model, jpeg_folder, "val", layers, k=4, image_size=32, batch_size=5, decode="cpu")
    dev = mine(model, jpeg_folder, "val", layers, k=4, image_size=32, batch_size=5, decode="device")
    for layer in layers:
        r, d = ref.layers[layer], dev.layers[layer]
        assert torch.allclose(r.top_values, d.top_values, rtol=0.05, atol=0.05)
        agree = (r.top_indices[:, 0] == d.top_indices[:, 0]).float().mean()
        assert agree >= 0.9


@pytest.mark.cuda
def test_nvjpeg_decoding_matches_the_cpu_decoder(jpeg_folder):
    ds = ImageFolderDataset(jpeg_folder / "val")
    cpu_x, _ = _all(JpegFolderLoader(ds, 7, train=False, image_size=128, num_workers=0, device="cpu"))
    gpu_x, _ = _all(JpegFolderLoader(ds, 7, train=False, image_size=128, num_workers=2, device="cuda"))
    diff = (gpu_x.cpu() - cpu_x).abs()
    # the decoders upsample chroma differently (nvJPEG by default repeats pixels where libjpeg-turbo
    # interpolates: on these noisy 4:2:0 JPEGs that alone is a mean near 1.4 levels) and round the IDCT
    # differently; a swapped channel, a shifted crop or a wrong resize is off by tens of levels nearly everywhere
    assert diff.mean() <= 3 * LEVEL, diff.mean() / LEVEL
    assert diff.flatten().quantile(0.999) <= 16 * LEVEL, diff.flatten().quantile(0.999) / LEVEL
    assert diff.max() <= 64 * LEVEL, diff.max() / LEVEL
    # one nvJPEG decoder for "cuda" and "cuda:0" alike (torchvision rebuilds it when the device differs)
    assert DeviceDecoder("cuda").device == DeviceDecoder(f"cuda:{torch.cuda.current_device()}").device



def _adobe_jpeg(img: Image.Image, transform: int) -> bytes:
    """``img`` encoded with its R, G, B stored as the three components (no YCbCr transform), the JFIF segment
    replaced by an Adobe APP14 one declaring ``transform`` (libjpeg reads JFIF as YCbCr, so it must go)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img), "YCbCr").save(buf, format="JPEG", quality=95, subsampling=0)  # as given
    blob = buf.getvalue()
    assert blob[2:4] == b"\xff\xe0"                                                   # JFIF APP0 first
    body = blob[4 + ((blob[4] << 8) | blob[5]):]
    payload = b"Adobe" + bytes([0, 100, 0, 0, 0, 0, transform])
    return b"\xff\xd8\xff\xee" + (len(payload) + 2).to_bytes(2, "big") + payload + body


def adobe_rgb_folder(tmp_path, rgb: Image.Image) -> Path:
    """A one-class folder holding ``rgb`` as an RGB-coded Adobe JPEG."""
    (tmp_path / "adobe" / "cat").mkdir(parents=True)
    (tmp_path / "adobe" / "cat" / "rgb.jpg").write_bytes(_adobe_jpeg(rgb, 0))
    return tmp_path / "adobe"


def test_an_rgb_coded_adobe_jpeg_goes_to_the_cpu_decoder_which_honours_its_marker(tmp_path):
    """A JPEG whose Adobe segment says its components are RGB, not YCbCr: PIL (libjpeg) gives back the
    image's colours, and the same bytes read as YCbCr are tens of levels off, so the file is left to the
    CPU decoder; with the segment saying YCbCr (1) it is an ordinary device JPEG."""
    import io

    rgb = _photo(np.random.default_rng(3), 48, 64)
    blob = _adobe_jpeg(rgb, 0)
    assert adobe_transform(blob) == 0 and adobe_transform(_adobe_jpeg(rgb, 1)) == 1
    decoded = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.int16)
    assert np.abs(decoded - np.asarray(rgb, dtype=np.int16)).mean() < 3
    as_ycbcr = np.asarray(Image.open(io.BytesIO(blob[:2] + blob[2 + 16:])).convert("RGB"), dtype=np.int16)
    assert np.abs(as_ycbcr - np.asarray(rgb, dtype=np.int16)).mean() > 20
    assert not device_decodable(blob) and device_decodable(_adobe_jpeg(rgb, 1))
    assert adobe_transform(encoded_jpeg(rgb)) is None and device_decodable(encoded_jpeg(rgb))
    seen = []
    decoder = DeviceDecoder("cpu")
    original = decoder._fallback
    decoder._fallback = lambda data, path: seen.append(path) or original(data, path)
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    (img,) = decoder([data], ["rgb.jpg"], [device_decodable(blob)])
    assert seen == ["rgb.jpg"] and np.abs(img.permute(1, 2, 0).numpy() - decoded).max() <= 1


@pytest.mark.cuda
def test_an_rgb_coded_adobe_jpeg_keeps_its_colours_through_the_gpu_loader(tmp_path):
    rgb = _photo(np.random.default_rng(4), 64, 64)
    ds = ImageFolderDataset(adobe_rgb_folder(tmp_path, rgb))
    cpu_x, _ = _all(JpegFolderLoader(ds, 1, train=False, image_size=64, num_workers=0, device="cpu"))
    gpu_x, _ = _all(JpegFolderLoader(ds, 1, train=False, image_size=64, num_workers=0, device="cuda"))
    assert (gpu_x.cpu() - cpu_x).abs().mean() <= LEVEL

def test_worker_processes_hand_over_packed_bytes(jpeg_folder):
    """With DataLoader workers each batch's bytes travel as one shared block; results equal the in-process run."""
    ds = ImageFolderDataset(jpeg_folder / "val")
    inline, _ = _all(JpegFolderLoader(ds, 4, train=False, image_size=32, num_workers=0, device="cpu"))
    workers, _ = _all(JpegFolderLoader(ds, 4, train=False, image_size=32, num_workers=2, device="cpu"))
    assert torch.equal(inline, workers)


def _decode_threads():
    import threading
    return [t for t in threading.enumerate() if t.name == "jpeg-decode" and t.is_alive()]


def test_background_decoding_gives_the_inline_batches_and_stops_cleanly(jpeg_folder, tmp_path):
    """The thread the GPU path decodes in (here without CUDA streams): same batches, early exit, errors."""
    ds = ImageFolderDataset(jpeg_folder / "train")

    def epochs(loader):
        out = []
        for e in (0, 1):
            loader.set_epoch(e)
            out.append(_all(loader))
        return out

    common = dict(train=True, image_size=48, augment="imagenet", num_workers=0, device="cpu", seed=3)
    inline = epochs(JpegFolderLoader(ds, 3, **common))
    background = epochs(JpegFolderLoader(ds, 3, background=True, prefetch=2, **common))
    for (xa, ya), (xb, yb) in zip(inline, background):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    loader = JpegFolderLoader(ds, 1, background=True, prefetch=1, **common)
    for _ in loader:      # leave after one batch while the thread has more queued
        break
    assert not _decode_threads()

    import shutil
    shutil.copytree(jpeg_folder / "val", tmp_path / "val")
    (tmp_path / "val" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    strict = ImageFolderDataset(tmp_path / "val", on_corrupt="error")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        list(JpegFolderLoader(strict, 4, train=False, image_size=32, num_workers=0, device="cpu", background=True))
    assert not _decode_threads()


def test_only_greyscale_and_colour_jpegs_go_to_the_device_decoder(jpeg_folder, tmp_path):
    """CMYK (4 components), PNGs and garbage are decoded on the CPU; the frame header tells them apart."""
    import io

    def encoded(img, **kw):
        buf = io.BytesIO()
        img.save(buf, **kw)
        return buf.getvalue()

    rgb = _photo(np.random.default_rng(1), 40, 60)
    baseline = encoded(rgb, format="JPEG")
    assert jpeg_frame(baseline) == (0xC0, 8, 3) and device_decodable(baseline)
    assert jpeg_frame(encoded(rgb, format="JPEG", progressive=True)) == (0xC2, 8, 3)
    assert jpeg_frame(encoded(rgb.convert("L"), format="JPEG")) == (0xC0, 8, 1)
    assert jpeg_frame(encoded(rgb.convert("CMYK"), format="JPEG"))[2] == 4
    assert jpeg_frame(encoded(rgb, format="PNG")) is None
    assert jpeg_frame(b"\xff\xd8\xff") is None and jpeg_frame(b"") is None
    sof = baseline.index(b"\xff\xc0")

    def patched(offset, value):
        blob = bytearray(baseline)
        blob[sof + offset] = value
        return bytes(blob)
    # arithmetic-coded and lossless frames, and 12-bit samples, are nvJPEG's to refuse: the CPU takes them
    assert jpeg_frame(patched(1, 0xC9)) == (0xC9, 8, 3) and not device_decodable(patched(1, 0xC9))
    assert not device_decodable(patched(1, 0xC3)) and device_decodable(patched(1, 0xC1))
    assert jpeg_frame(patched(4, 12)) == (0xC0, 12, 3) and not device_decodable(patched(4, 12))
    assert [device_decodable(encoded(rgb.convert(m), format="JPEG")) for m in ("L", "CMYK")] == [True, False]
    import shutil
    shutil.copytree(jpeg_folder / "val", tmp_path / "val")
    rgb.convert("CMYK").save(tmp_path / "val" / "dog" / "print.jpg", format="JPEG")
    ds = ImageFolderDataset(tmp_path / "val", on_corrupt="error")
    batches = list(JpegFolderLoader(ds, 8, train=False, image_size=32, num_workers=0, device="cpu"))
    assert sum(len(b.targets) for b in batches) == 15 and not any(b.skipped for b in batches)


def test_gpu_loader_workers_fork_from_a_server_that_imported_the_loader_once():
    """With CUDA in use workers start from a fork server (never forked from a process holding CUDA); it
    imports this module (so torch and torchvision) once, and every worker forked from it starts without."""
    import multiprocessing.forkserver as forkserver

    from pruning.data import jpeg

    gpu = jpeg._worker_options(2, torch.device("cuda"))
    assert gpu["multiprocessing_context"] == "forkserver" and gpu["num_workers"] == 2
    assert forkserver._forkserver._preload_modules == ["pruning.data.jpeg"] == list(jpeg.FORK_SERVER_PRELOAD)
    assert jpeg._worker_options(2, torch.device("cpu"))["multiprocessing_context"] is None
    assert jpeg._worker_options(0, torch.device("cuda")) == {"num_workers": 0}


@pytest.mark.cuda
def test_a_very_large_image_is_resized_on_the_gpu_as_on_the_cpu():
    """A 6,400-px photo into a 64-px study is a 100× downscale, beyond what CUDA's antialiased kernel holds in
    shared memory: it is resized (on the CPU, by the same filter) instead of stopping the pass."""
    from pruning.data.jpeg import _resize

    img = torch.randint(0, 256, (3, 6400, 4800), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = _resize(img, (85, 64))
    out = _resize(img.cuda(), (85, 64))
    assert out.device.type == "cuda" and torch.allclose(out.cpu(), ref, atol=1e-3)
    normal = _resize(img[:, :1280, :960].cuda(), (85, 64))          # 15×: on the GPU
    assert torch.allclose(normal.cpu(), _resize(img[:, :1280, :960], (85, 64)), atol=0.05)
