"""The kernel's small parts: atomic writes, the study layout, flags as settings, the study context."""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from sparsight.config import load_study, settings_tree
from sparsight.errors import closest, module_choices
from sparsight.files import atomic_write, atomic_write_frame, atomic_write_text, json_digest, stable_int
from sparsight.layout import Layout
from sparsight.study import Study
from thread_ranks import ThreadRanks


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = atomic_write_text(tmp_path / "table.csv", "old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            tmp.write_text("half a new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]     # no temporary file left behind


def test_concurrent_atomic_writers_never_leave_a_mixed_file(tmp_path):
    path = tmp_path / "shared.txt"
    texts = [str(i) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=atomic_write_text, args=(path, t)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]


def test_atomic_frame_picks_the_format_from_the_suffix(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"unit": [1, 2], "mis": [0.5, 0.75]})
    pd.testing.assert_frame_equal(pd.read_csv(atomic_write_frame(frame, tmp_path / "a.csv")), frame)
    pd.testing.assert_frame_equal(pd.read_parquet(atomic_write_frame(frame, tmp_path / "a.parquet")), frame)


def test_layout_spells_the_design_contract(tmp_path):
    layout = Layout(tmp_path)
    expected = {layout.study_toml: "study.toml", layout.checkpoint("base"): "models/base/model.pt",
                layout.meta("base"): "models/base/meta.json", layout.manifest: "stimuli/manifest.parquet",
                layout.mis_units: "mis/units.csv", layout.dissection_units: "dissection/units.csv",
                layout.survey_db: "survey.db", layout.report_html: "report/index.html",
                layout.evaluation: "evaluation.csv"}
    assert {str(p.relative_to(tmp_path)): v for p, v in expected.items()} == {v: v for v in expected.values()}
    assert layout.responses() is None and not layout.has_model("base")
    (tmp_path / "responses.parquet").touch()
    assert layout.responses() == tmp_path / "responses.parquet"
    (tmp_path / "responses.csv").touch()
    assert layout.responses() == tmp_path / "responses.csv"        # CSV first, as the analysis reads it


def test_flags_are_settings_applied_after_set_overrides():
    assert settings_tree({"train.epochs": 3, "train.lr": None, "study.name": "x"}) == {
        "train": {"epochs": 3}, "study": {"name": "x"}}
    cfg = load_study(profile="quick", overrides=["train.epochs=7", "train.lr=0.5"],
                     settings=settings_tree({"train.epochs": 2, "train.lr": None}))
    assert cfg.train.epochs == 2 and cfg.train.lr == 0.5
    from sparsight.config import ConfigError
    with pytest.raises(ConfigError, match="unknown key train.epoch"):
        load_study(profile="quick", settings={"train": {"epoch": 2}})


def test_study_paths_and_upstream_records(tmp_path):
    cfg = load_study(profile="quick", overrides=[f'study.output_dir="{tmp_path}"'])
    study = Study(cfg)
    assert study.data_root == tmp_path / "quick" / "data" == study.layout.data
    assert study.upstream("base") == {"fingerprint": None, "outputs": None}
    study.records["base"] = {"fingerprint": "f", "outputs": {"models/base/model.pt": "d"}, "seconds": 1.0}
    assert study.upstream("base") == {"fingerprint": "f", "outputs": {"models/base/model.pt": "d"}}


def test_open_study_leaves_the_process_group_whatever_happens(monkeypatch):
    from pruning.training import distributed

    closed = []

    class Group:
        is_main, device = True, "cpu"

        def close(self, clean=True):
            closed.append(clean)

    monkeypatch.setattr(distributed, "init_distributed", lambda device: Group())
    with pytest.raises(ValueError):
        with distributed.open_study(load_study(profile="quick")) as study:
            assert isinstance(study.ctx, Group) and study.is_main
            raise ValueError("a stage failed")
    assert closed == [False]        # after an error: left without waiting for the other ranks
    with distributed.open_study(load_study(profile="quick")):
        pass
    assert closed == [False, True]  # a normal end: every rank meets before leaving


def test_closest_names_the_similar_choices_only():
    assert closest("inception4z", ["conv1", "inception4a", "fc"]) == "; did you mean 'inception4a'?"
    assert closest("xyz", ["conv1", "inception4a", "fc"]) == ""


def test_module_choices_keep_short_lists_and_shorten_deep_ones_to_the_top_level():
    short = ["conv1", "conv1.bn", "fc"]
    assert module_choices(short) == str(short)
    deep = ["", "conv1", *(f"conv1.b{i}" for i in range(50)), "fc", "fc.drop"]
    assert module_choices(deep) == "['conv1', 'fc'] and their submodules (e.g. 'conv1.b0'; 53 in all)"
    flat = [f"block.{i}" for i in range(50)]          # nothing at the top level: every name stays
    assert module_choices(flat) == str(flat)


class _Written:
    """A stage that only rank 0 writes (as report and survey stages do); ``after`` makes it depend on one."""

    def __init__(self, name: str, after: str | None = None, fail: bool = False):
        self.name, self.description, self.after, self.fail, self.runs = name, name, after, fail, []

    def inputs(self, study):
        if self.fail:
            raise ValueError("the survey database is unreachable")
        return {"upstream": study.upstream(self.after)} if self.after else {}

    def run(self, study):
        self.runs.append(study.ctx.is_main)
        if not study.is_main:
            return []
        return [atomic_write_text(study.path(f"{self.name}.txt"), "written by rank 0")]


def _run_ranks(tmp_path, stages, force=()):
    from sparsight.study import run_study

    cfg = load_study(overrides=[f'study.output_dir="{tmp_path}"', 'study.name="ranks"'])
    _, errors = ThreadRanks(2).run(lambda ctx: run_study(Study(cfg, ctx), stages, force=force, log=lambda *a: None))
    return errors


def test_every_rank_takes_rank_0s_decisions_and_records(tmp_path):
    """A rerun that forces the first stage: rank 1 wrote none of its outputs, yet must skip the unchanged
    second stage with rank 0, not run it alone and wait for rank 0 at its barrier."""
    first, second = _Written("first"), _Written("second", after="first")
    assert _run_ranks(tmp_path, [first, second]) == [None, None]
    assert sorted(second.runs) == [False, True]
    assert _run_ranks(tmp_path, [first, second], force=("first",)) == [None, None]
    assert sorted(first.runs) == [False, False, True, True] and len(second.runs) == 2     # skipped on both ranks


def test_an_error_deciding_on_rank_0_stops_every_rank(tmp_path):
    errors = _run_ranks(tmp_path, [_Written("mis", fail=True)])
    assert isinstance(errors[0], ValueError)
    assert isinstance(errors[1], RuntimeError) and "rank 0 stopped: ValueError: the survey database" in str(errors[1])


class _Settable:
    """A stage whose inputs are settings the test changes."""

    def __init__(self):
        self.name, self.description, self.settings = "scores", "score the units", {"alpha": 4.0, "beta": 1}

    def inputs(self, study):
        return {"scores": dict(self.settings), "seed": 0}

    def run(self, study):
        return [atomic_write_text(study.path("scores.txt"), f"{self.settings}")]


def test_a_stage_that_runs_again_says_why(tmp_path):
    """The run log and the plan name what made a stage run again: the settings that changed (dotted), an output
    that is gone or was edited, or --force; a first run needs no reason, and an unchanged rerun skips."""
    from sparsight.study import plan_study, run_study

    cfg = load_study(overrides=[f'study.output_dir="{tmp_path}"', 'study.name="why"'])
    stage = _Settable()

    def logged(force=()):
        lines = []
        run_study(Study(cfg), [stage], force=force, log=lines.append)
        return lines[0]

    assert logged() == "[scores] score the units"
    record = json.loads((tmp_path / "why" / ".stages" / "scores.json").read_text())
    assert record["inputs"] == {"scores": {"alpha": 4.0, "beta": 1}, "seed": 0}
    assert logged() == "[scores] up to date, skipped"
    stage.settings = {"alpha": 8.0, "beta": 2, "gamma": True}
    assert plan_study(cfg, [stage])[0][1] == "runs (changed: scores.alpha, scores.beta, scores.gamma)"
    assert logged() == "[scores] score the units (changed: scores.alpha, scores.beta, scores.gamma)"
    (tmp_path / "why" / "scores.txt").write_text("edited")
    assert logged() == "[scores] score the units (scores.txt was changed since)"
    (tmp_path / "why" / "scores.txt").unlink()
    assert plan_study(cfg, [stage])[0][1] == "runs (scores.txt is missing)"
    assert logged() == "[scores] score the units (scores.txt is missing)"
    assert logged(force=("scores",)) == "[scores] score the units (forced)"
    stage.settings = {f"k{i}": i for i in range(7)}
    assert logged().endswith("(changed: scores.alpha, scores.beta, scores.gamma, scores.k0 and 6 more)")


@pytest.mark.parametrize("value, path", [("runs/w.pt", True), ("./w", True), ("~/w", True), ("W.PTH", True),
                                         ("model.safetensors", True), ("DEFAULT", False), ("IMAGENET1K_V1", False),
                                         ("GoogLeNet_Weights.IMAGENET1K_V1", False)])
def test_a_weights_setting_is_a_file_or_a_registered_name_by_one_rule(value, path):
    """The study settings and the model registry read ``model.weights`` by the same rule."""
    from sparsight.files import looks_like_path
    assert looks_like_path(value) is path


def test_the_fingerprint_is_sorted_key_json_hashed_whatever_the_insertion_order():
    """Stored work is reused by this digest, so it must not depend on key order and must hash exactly the JSON text
    (a digest that changed with the code's spelling would rerun every stage of every existing study)."""
    a = {"lr": 0.1, "layers": ["conv1", "mixed3a"], "root": Path("/data/x"), "nested": {"b": 2, "a": 1}}
    b = {"nested": {"a": 1, "b": 2}, "root": Path("/data/x"), "layers": ["conv1", "mixed3a"], "lr": 0.1}
    reference = hashlib.sha256(b'{"layers": ["conv1", "mixed3a"], "lr": 0.1, "nested": {"a": 1, "b": 2}, '
                               b'"root": "/data/x"}').hexdigest()
    assert json_digest(a) == json_digest(b) == reference
    assert json_digest(a, 16) == reference[:16]
    assert json_digest({**a, "lr": 0.01}) != reference


def test_a_stable_seed_is_the_leading_bytes_of_the_texts_sha256():
    digest = hashlib.sha256(b"7:structured-oneshot-r0.50").digest()
    assert stable_int("7:structured-oneshot-r0.50") == int.from_bytes(digest[:8], "little")
    assert stable_int("7:structured-oneshot-r0.50", 6, "big") == int.from_bytes(digest[:6], "big") < 2 ** 48
    assert stable_int("7:structured-oneshot-r0.50") != stable_int("7:structured-oneshot-r0.75")
