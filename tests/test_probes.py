"""Probe-set layouts: Broden's release format (index.csv, 16-bit label PNGs, several maps per image,
whole-image labels, primary categories) against a brute-force reference written from the
format's definition, the Broden export of any probe set, and errors that name the file."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pruning.data.folders import IMAGENET_MEAN, IMAGENET_STD
from stimuli.dissection import dissect
from stimuli.probes import ProbeError, ProbeSet, open_probe, write_broden
from test_dissection import SIZE, TinyNet, bilinear, probe_dir  # noqa: F401 (probe_dir: a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

CATEGORIES = ["color", "object", "part", "scene"]
#: label number → (name, {category: coverage}); "wheel" is an object and a part, mostly a part
LABELS = {1: ("red", {"color": 0.3}), 2: ("blue", {"color": 0.2}), 5: ("hair", {"part": 0.05}),
          300: ("person", {"object": 0.2}), 301: ("wheel", {"object": 0.01, "part": 0.04}),
          1100: ("street", {"scene": 0.5}), 7: ("unused", {})}
MAP_SIZES = [(12, 12), (8, 8), (12, 12), (6, 9), (8, 8), (12, 12)]


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet().double().eval()


def write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        w.writerows(rows)


def label_png(path: Path, numbers: np.ndarray) -> str:
    """Label numbers as Broden's RGB encoding (R = n mod 256, G = n div 256); returns the name."""
    rgb = np.stack([numbers % 256, numbers // 256, np.full_like(numbers, 77)], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(path)
    return path.name


@pytest.fixture
def broden(tmp_path):
    """A hand-written Broden release: 6 images; colour maps everywhere, object maps on 4 images, part
    maps on 2 (some pixels are "wheel" in both), the scene "street" on the even images; label maps
    smaller than the images; the "unused" label is in no category."""
    rng = np.random.default_rng(1)
    root = tmp_path / "broden"
    (root / "images" / "src").mkdir(parents=True)
    write_rows(root / "category.csv", ["name", "first", "last", "count", "frequency"],
               [{"name": c, "first": 0, "last": 0, "count": 0, "frequency": 0} for c in CATEGORIES])
    write_rows(root / "label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
               [{"number": n, "name": name, "category": ";".join(f"{c}(3)" for c in cov), "frequency": 3,
                 "coverage": 0.1, "syns": ""} for n, (name, cov) in sorted(LABELS.items())])
    for cat in CATEGORIES:
        write_rows(root / f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
                   [{"code": k + 1, "number": n, "name": LABELS[n][0], "frequency": 3, "coverage": LABELS[n][1][cat]}
                    for k, n in enumerate(n for n in sorted(LABELS) if cat in LABELS[n][1])])
    rows = []
    for i, (h, w) in enumerate(MAP_SIZES):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), "RGB").save(
            root / "images" / "src" / f"im{i}.jpg" if i == 2 else root / "images" / "src" / f"im{i}.png")
        cells = {c: [] for c in CATEGORIES}
        cells["color"].append("src/" + label_png(root / "images" / "src" / f"im{i}_color.png",
                                                 rng.choice([0, 1, 2], (h, w))))
        obj = None
        if i % 3 != 2:
            obj = rng.choice([0, 300, 301], (h, w), p=[0.4, 0.3, 0.3])
            cells["object"].append("src/" + label_png(root / "images" / "src" / f"im{i}_object.png", obj))
        if i in (1, 3):
            part = rng.choice([0, 301, 5], (h, w))
            if obj is not None:
                part[obj == 301] = 301                 # these pixels are "wheel" twice: they count once
            cells["part"].append("src/" + label_png(root / "images" / "src" / f"im{i}_part.png", part))
        if i % 2 == 0:
            cells["scene"].append("1100")
        if i == 0:
            cells["object"].append("300")              # "person" on the whole image and in its object map
        if i == 3:
            cells["scene"].append("0")                 # a label dropped when the release was built: ignored
        rows.append({"image": f"src/im{i}.{'jpg' if i == 2 else 'png'}", "split": "train" if i < 3 else "val",
                     "ih": SIZE, "iw": SIZE, "sh": h, "sw": w, **{c: ";".join(v) for c, v in cells.items()}})
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8), "RGB").save(root / "images" / "src" / "bare.png")
    rows.append({"image": "src/bare.png", "split": "val", "ih": SIZE, "iw": SIZE, "sh": 4, "sw": 4,
                 **{c: "" for c in CATEGORIES}, "scene": "0"})   # no label at all: not part of the probe
    write_rows(root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw"] + CATEGORIES, rows)
    return root


def primary(n: int) -> str:
    cov = LABELS[n][1]
    return max(CATEGORIES, key=lambda c: (cov.get(c, 0), -CATEGORIES.index(c)))


def reference_broden(model, root: Path, layer: str, quantile: float):
    """Σ|M ∩ L_c| and Σ|M ∪ L_c| by loops, read straight from index.csv: a concept is a label number of
    a category; its sums run over the images with a label of its primary category."""
    with (root / "index.csv").open() as f:
        index = [row for row in csv.DictReader(f) if any(row[c] not in ("", "0") for c in CATEGORIES)]
    concepts = [n for n in sorted(LABELS) if LABELS[n][1]]
    acts, images = [], []
    module = dict(model.named_modules())[layer]
    for row in index:
        x = (np.asarray(Image.open(root / "images" / row["image"]).convert("RGB"), dtype=np.float64) / 255
             - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        out = {}
        handle = module.register_forward_hook(lambda m, i, o: out.__setitem__("a", o))
        with torch.no_grad():
            model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])
        handle.remove()
        acts.append(out["a"][0].numpy())
        h, w = int(row["sh"]), int(row["sw"])
        maps, scalars = [], []
        for cat in CATEGORIES:
            for token in filter(None, row[cat].split(";")):
                if token.isdigit():
                    if int(token):
                        scalars.append(int(token))
                else:
                    rgb = np.asarray(Image.open(root / "images" / token)).astype(np.int64)
                    maps.append(rgb[..., 0] + 256 * rgb[..., 1])
        images.append((h, w, maps, scalars))
    units = acts[0].shape[0]
    thresholds = [np.quantile(np.concatenate([a[u].ravel() for a in acts]), quantile) for u in range(units)]
    inter = np.zeros((units, len(concepts)), np.int64)
    union = np.zeros((units, len(concepts)), np.int64)
    for a, (h, w, maps, scalars) in zip(acts, images):
        labelled = {primary(int(n)) for m in maps for n in np.unique(m) if n} | {primary(n) for n in scalars}
        for u in range(units):
            m = bilinear(a[u], h, w) > thresholds[u]
            for c, n in enumerate(concepts):
                if primary(n) not in labelled:
                    continue
                concept = np.full((h, w), n in scalars)
                for lab in maps:
                    concept |= lab == n
                inter[u, c] += int(np.sum(m & concept))
                union[u, c] += int(np.sum(m | concept))
    return concepts, inter, union


@pytest.mark.parametrize("batch_size, chunk", [(64, 2 ** 24), (2, 40)])
def test_broden_dissection_equals_a_reference_read_from_the_index(tiny_net, broden, batch_size, chunk):
    probe = open_probe(broden)
    assert probe.categories == tuple(CATEGORIES) and len(probe) == 6
    concepts, inter, union = reference_broden(tiny_net, broden, "conv2", 0.8)
    assert probe.concepts == tuple((primary(n), LABELS[n][0]) for n in concepts)
    assert ("part", "wheel") in probe.concepts and ("scene", "street") in probe.concepts
    result = dissect(tiny_net, probe, ["conv2"], image_size=SIZE, quantile=0.8, batch_size=batch_size,
                     chunk_elements=chunk)
    assert inter.sum() > 0 and inter[:, [c for c, n in enumerate(concepts) if n == 1100]].sum() > 0
    assert torch.equal(result.layers["conv2"].intersection, torch.from_numpy(inter))
    assert torch.equal(result.union("conv2"), torch.from_numpy(union))
    assert (result.iou("conv2") <= 1).all()


def test_a_pixel_with_the_same_concept_in_two_maps_counts_once(broden):
    probe = open_probe(broden)
    labels = probe.read_labels(1)                          # object and part maps share "wheel" pixels
    wheel = probe.concepts.index(("part", "wheel")) + 1
    rgb = [np.asarray(Image.open(p)).astype(int) for p in probe.entries[1].maps]
    expected = np.zeros(labels.size, bool)
    for m in rgb:
        expected |= (m[..., 0] + 256 * m[..., 1]) == 301
    assert ((labels.planes == wheel).sum(0) <= 1).all()
    assert np.array_equal((labels.planes == wheel).any(0), expected) and expected.sum() > 0
    assert labels.categories.tolist() == [True, True, True, False]     # no scene on an odd image


def test_any_probe_set_written_as_broden_dissects_the_same(tiny_net, probe_dir, tmp_path):
    bare = probe_dir / "masks" / "sub" / "img1.png"
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA").save(bare)   # an image without any label stays
    folder = ProbeSet.from_folder(probe_dir)
    broden = open_probe(write_broden(folder, tmp_path / "as-broden"))
    assert broden.concepts == folder.concepts and broden.categories == folder.categories
    empty = [i for i, path in enumerate(folder.images) if path.stem == "img1"][0]
    assert len(broden) == len(folder) == 6 and not broden.read_labels(empty).categories.any()
    a = dissect(tiny_net, folder, ["act1", "conv2"], image_size=SIZE, quantile=0.9)
    b = dissect(tiny_net, broden, ["act1", "conv2"], image_size=SIZE, quantile=0.9)
    pd.testing.assert_frame_equal(a.unit_table("m"), b.unit_table("m"))
    for layer in ("act1", "conv2"):
        assert torch.equal(a.union(layer), b.union(layer))
    again = open_probe(write_broden(broden, tmp_path / "again"))      # whole-image labels survive a round trip
    assert again.concepts == broden.concepts


def test_broden_errors_name_the_file(broden, tiny_net):
    bad = broden / "images" / "src" / "im0_color.png"
    label_png(bad, np.full(MAP_SIZES[0], 7))                         # "unused": in no category
    with pytest.raises(ProbeError, match=f"{bad} holds label number 7"):
        dissect(tiny_net, open_probe(broden), ["conv1"], image_size=SIZE)
    label_png(bad, np.full((5, 5), 1))
    with pytest.raises(ProbeError, match=f"{bad} is 5×5 but index.csv gives sw×sh = 12×12"):
        dissect(tiny_net, open_probe(broden), ["conv1"], image_size=SIZE)
    bad.unlink()
    with pytest.raises(ProbeError, match=f"index.csv line 2: label map {bad} does not exist"):
        open_probe(broden)
    (broden / "category.csv").unlink()
    with pytest.raises(ProbeError, match=f"Broden file {broden / 'category.csv'} does not exist"):
        open_probe(broden)
    (broden / "index.csv").unlink()
    with pytest.raises(ProbeError, match="neither index.csv .Broden. nor concepts.json"):
        open_probe(broden)


def test_whole_image_labels_must_be_known(broden):
    text = (broden / "index.csv").read_text().replace(",1100", ",1234", 1)
    (broden / "index.csv").write_text(text)
    with pytest.raises(ProbeError, match="index.csv line 2: whole-image label 1234 .scene. is not a concept: not in label.csv"):
        open_probe(broden)


def test_without_c_files_the_label_csv_counts_pick_the_primary_category(broden):
    for cat in CATEGORIES:
        (broden / f"c_{cat}.csv").unlink()
    text = (broden / "label.csv").read_text().replace("object(3);part(3)", "object(2);part(9)")
    (broden / "label.csv").write_text(text)
    assert ("part", "wheel") in open_probe(broden).concepts


@pytest.mark.cuda
def test_broden_dissection_on_cuda_equals_the_cpu(tiny_net, broden):
    probe = open_probe(broden)
    cpu = dissect(tiny_net, probe, ["act1", "conv2"], image_size=SIZE, quantile=0.8, batch_size=4, chunk_elements=40)
    gpu = dissect(tiny_net, probe, ["act1", "conv2"], image_size=SIZE, quantile=0.8, batch_size=4, chunk_elements=40,
                  device="cuda")
    assert next(tiny_net.parameters()).device.type == "cpu"          # moved back
    for layer in ("act1", "conv2"):
        a, b = cpu.layers[layer], gpu.layers[layer]
        assert torch.allclose(a.threshold, b.threshold, rtol=1e-10, atol=1e-12)
        assert torch.equal(a.intersection, b.intersection) and torch.equal(cpu.union(layer), gpu.union(layer))


def test_the_dissection_benchmark_agrees_with_its_loop_on_a_broden_size_concept_list(tmp_path):
    from benchmarks import dissection as bench

    args = bench.get_args_parser().parse_args(["--device", "cpu", "--arch", "inception-small", "--image-size", "32",
                                               "--images", "12", "--loop-images", "6", "--batch-size", "5",
                                               "--workdir", str(tmp_path)])
    result = bench.main(args)
    assert result["equal"] and result["thresholds_close"] and result["concepts"] == 1376
    probe = open_probe(tmp_path / "broden")                      # what it wrote is a valid Broden release
    assert len(probe) == 12 and probe.categories == tuple(bench.BRODEN_SIZES)
    labels = probe.read_labels(0)
    assert labels.scalars.size == 2 and labels.categories.all()   # image 0: every category, scene and texture


def test_a_concept_given_for_the_whole_image_and_in_a_map_counts_once(broden):
    probe = open_probe(broden)
    labels = probe.read_labels(0)
    person = probe.concepts.index(("object", "person"))
    assert person in labels.scalars and not (labels.planes == person + 1).any()


def test_palette_label_maps_are_read_and_other_modes_are_refused(broden, tiny_net):
    path = broden / "images" / "src" / "im1_color.png"
    before = open_probe(broden).read_labels(1).planes.copy()
    rgb = np.asarray(Image.open(path).convert("RGB"))
    colours, index = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
    palette = Image.fromarray(index.reshape(rgb.shape[:2]).astype(np.uint8), "P")
    palette.putpalette(colours.astype(np.uint8).ravel().tolist())
    palette.save(path)                                                   # the same pixels as a palette PNG
    assert Image.open(path).mode == "P"
    assert np.array_equal(open_probe(broden).read_labels(1).planes, before)     # lossless re-encoding
    Image.open(path).convert("RGB").convert("LA").save(path)
    with pytest.raises(ProbeError, match=f"{path} has PNG mode 'LA'; it must be RGB, RGBA or a palette PNG"):
        open_probe(broden).read_labels(1)


def test_equal_coverage_goes_to_the_later_category_and_c_files_come_all_or_none(broden):
    path = broden / "c_object.csv"
    path.write_text(path.read_text().replace("301,wheel,3,0.01", "301,wheel,3,0.04"))
    assert ("part", "wheel") in open_probe(broden).concepts              # as NetDissect-Lite: max((coverage, k))
    path.unlink()
    with pytest.raises(ProbeError, match=f"{path} does not exist .the other categories have one."):
        open_probe(broden)


def test_labels_cross_from_dataloader_workers_without_holding_file_descriptors(tmp_path):
    """With many images, tensors from workers keep one shared-memory descriptor each; numpy labels none."""
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "concepts.json").write_text('{"mask_layers": ["a", "b"], "concepts": {"a": ["x"], "b": ["y"]}}')
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(root / "images" / f"{i}.png")
        Image.fromarray(rng.integers(0, 2, (4, 4, 2), dtype=np.uint8), "LA").save(root / "masks" / f"{i}.png")
    script = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from stimuli.dissection import ProbeLoader
        from stimuli.probes import ProbeSet
        loader = ProbeLoader(ProbeSet.from_folder({str(root)!r}), 8, 100, cache="memory", num_workers=2)
        images, labels = loader._decode_all()
        print("decoded", len(labels))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and "decoded 300" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("layout", ["broden", "folder"])
def test_a_copied_probe_keeps_its_fingerprint_and_a_changed_file_does_not(broden, probe_dir, tmp_path, layout,
                                                                         monkeypatch):
    """The fingerprint (what decides whether dissection reruns) follows the files' contents: a copy with new
    modification times is the same probe; one changed label byte is not; above the content-hash size the
    modification time stands in for the contents."""
    import os
    import shutil

    import stimuli.probes as probes

    source = broden if layout == "broden" else probe_dir
    copy = tmp_path / f"copy-{layout}"
    shutil.copytree(source, copy, copy_function=shutil.copyfile)        # contents only: new mtimes
    assert open_probe(copy).fingerprint() == open_probe(source).fingerprint()
    copied = open_probe(copy)
    label = copied.decoder.files(copied.entries[0])[0]          # the first image's first label map
    pixels = np.array(Image.open(label))
    pixels.flat[0] ^= 1
    Image.fromarray(pixels).save(label)
    assert open_probe(copy).fingerprint() != open_probe(source).fingerprint()
    monkeypatch.setattr(probes, "CONTENT_HASH_BYTES", 0)
    before = open_probe(source).fingerprint()
    image = open_probe(source).images[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert open_probe(source).fingerprint() != before
