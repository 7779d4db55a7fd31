"""The wheel folder for a GPU machine without a package index: what it resolves for, what it leaves out."""
import pytest

from benchmarks import wheelhouse


def test_requirements_apply_the_targets_python_markers():
    for_312 = wheelhouse.project_requirements("3.12")
    for_310 = wheelhouse.project_requirements("3.10")
    assert not any(r.startswith("tomli") for r in for_312)
    assert any(r.startswith("tomli") for r in for_310)
    assert len(for_310) == len(for_312) + 1
    assert any(r.startswith("torch-lucent==") for r in for_312) and for_312[-1].startswith("pytest")
    assert not any(r.startswith("playwright") for r in for_312)     # the browser tests do not run there


def test_have_reads_names_freeze_and_list_files(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("Flask==3.1.3\n# a comment\nTyping_Extensions @ file:///x\n\n")
    listing = tmp_path / "list.txt"
    listing.write_text("Package    Version\n---------- -------\nnumpy      2.5.2\nzope.interface 7.0\n")
    assert wheelhouse.read_have([str(freeze), str(listing), "PyYAML"]) == {
        "flask", "typing-extensions", "numpy", "zope-interface", "pyyaml"}


def test_carried_leaves_out_what_the_target_has_and_its_cuda_stack():
    resolved = [("Flask", "3.1.3"), ("torch", "2.7.1"), ("nvidia-cublas-cu12", "12.6"), ("triton", "3.3.1"),
                ("torchvision", "0.22.1"), ("zennit", "0.5.1"), ("Jinja2", "3.1.6"), ("torch-pruning", "1.6.1")]
    assert wheelhouse.carried(resolved, {"jinja2"}) == [("Flask", "3.1.3"), ("torch-pruning", "1.6.1"),
                                                        ("zennit", "0.5.1")]


def test_local_pins_hold_the_tested_versions():
    from importlib import metadata

    pins = dict(p.split("==") for p in wheelhouse.local_pins())
    assert pins["zennit"] == metadata.version("zennit") and "torch" not in pins


@pytest.mark.parametrize("op,expected", [("<", False), (">=", True), ("==", True), ("!=", False)])
def test_python_marker_comparison(op, expected):
    assert wheelhouse._compare((3, 12), op, (3, 12) if op in ("==", "!=") else (3, 11)) is expected


def test_a_rerun_leaves_only_this_runs_wheels(monkeypatch, tmp_path):
    """Two versions of one package in the folder would stop the target's install: earlier wheels go."""
    out = tmp_path / "wheels"
    out.mkdir()
    (out / "zennit-1.0.0-py3-none-any.whl").write_bytes(b"old")
    monkeypatch.setattr(wheelhouse, "resolve", lambda reqs, python, platforms, pins: [("zennit", "0.5.1")])

    def download(pins, folder, python, platforms):
        for name, version in pins:
            (folder / f"{name}-{version}-py3-none-any.whl").write_bytes(b"new")

    monkeypatch.setattr(wheelhouse, "download", download)
    result = wheelhouse.main(wheelhouse.get_args_parser().parse_args(["--out", str(out), "--have", "numpy"]))
    assert sorted(p.name for p in out.glob("*.whl")) == ["zennit-0.5.1-py3-none-any.whl"]
    assert result["wheels"] == ["zennit-0.5.1-py3-none-any.whl"]
    assert (out / "requirements.txt").read_text() == "zennit==0.5.1\n"
