import csv
import hashlib
import json

import numpy as np
from PIL import Image

from pruning.data import concept_shapes as cs


def _digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kw = dict(train_per_class=30, val_per_class=3, image_size=32)  # > one chunk of 256 images
    cs.generate(a, seed=7, workers=1, **kw)
    cs.generate(b, seed=7, workers=2, **kw)
    cs.generate(c, seed=8, workers=1, **kw)
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    assert len(da) == 2 * 330 + 3  # images + label maps + (concepts.json, train.csv, val.csv)
    changed = [k for k in da if k.endswith(".png") and dc.get(k) != da[k]]
    assert len(changed) > 0.9 * sum(k.endswith(".png") for k in da)


def test_imagefolder_layout_and_index(tiny_data):
    info = json.loads((tiny_data / "concepts.json").read_text())
    assert info["classes"] == list(cs.SHAPES) and len(cs.SHAPES) == 10
    for split, per_class in (("train", 16), ("val", 6)):
        for shape in cs.SHAPES:
            assert len(list((tiny_data / split / shape).glob("*.png"))) == per_class
        rows = list(csv.DictReader(open(tiny_data / f"{split}.csv")))
        assert len(rows) == 10 * per_class
        assert all(r["file"].split("/")[1] == r["shape"] for r in rows)


def test_label_maps_align_with_objects(tiny_data):
    rows = list(csv.DictReader(open(tiny_data / "train.csv")))
    palette = np.array(list(cs.COLOURS.values()), dtype=float)
    checked = 0
    for r in rows:
        img = np.asarray(Image.open(tiny_data / r["file"]).convert("RGB")).astype(float)
        lab = cs.read_label_map(tiny_data / "masks" / r["file"])
        fg = lab[..., 0] > 0
        # the four layers partition the image: concepts on the object, background off it
        assert np.array_equal(fg, lab[..., 1] > 0) and np.array_equal(fg, lab[..., 2] > 0)
        assert np.array_equal(~fg, lab[..., 3] > 0)
        assert set(np.unique(lab[fg, 0])) == {cs.SHAPES.index(r["shape"]) + 1}
        assert set(np.unique(lab[fg, 1])) == {list(cs.COLOURS).index(r["colour"]) + 1}
        assert set(np.unique(lab[fg, 2])) == {cs.TEXTURES.index(r["texture"]) + 1}
        assert set(np.unique(lab[~fg, 3])) == {cs.BACKGROUNDS.index(r["background"]) + 1}
        assert abs(fg.mean() - float(r["foreground_fraction"])) < 1e-3
        if r["texture"] == "solid":
            # object pixels (away from edges) carry the object's colour; background pixels do not
            colour = palette[list(cs.COLOURS).index(r["colour"])]
            inner = fg & np.roll(fg, 1, 0) & np.roll(fg, -1, 0) & np.roll(fg, 1, 1) & np.roll(fg, -1, 1)
            dist_in = np.abs(img[inner] - colour).max(axis=1)
            dist_out = np.abs(img[~fg] - colour).max(axis=1)
            assert np.mean(dist_in < 45) > 0.95
            assert np.mean(dist_out < 45) < 0.5
            checked += 1
    assert checked > 0


def test_render_is_vectorized_consistently():
    rng = np.random.default_rng(0)
    labels = np.arange(10)
    params = cs.sample_params(labels, rng)
    batch, fg = cs.render(params, 32)
    for i in range(10):
        single, fg_i = cs.render(params.take([i]), 32)
        assert np.array_equal(single[0], batch[i]) and np.array_equal(fg_i[0], fg[i])
