import dataclasses
import tomllib

import pytest

from sparsight.config import (PROFILES, ConfigError, StudyConfig, describe_options, load_study, parse_override,
                              write_study)


def test_default_is_complete_and_round_trips(tmp_path):
    cfg = load_study()
    path = write_study(cfg, tmp_path)
    written = tomllib.loads(path.read_text())
    assert written == cfg.to_dict()
    # every section and key of the schema is present in the written file
    for section in dataclasses.fields(StudyConfig):
        assert set(written[section.name]) == {f.name for f in dataclasses.fields(getattr(cfg, section.name))}
    again = load_study(path)
    assert again.to_dict() == cfg.to_dict()


def test_the_paper_protocol_mines_exemplars_from_the_training_split():
    """Borowski et al. 2021 and Zimmermann et al. 2023 take queries and references from ImageNet's training
    set; the demo mines its held-out split."""
    from pathlib import Path

    assert load_study(profile="paper").stimuli.split == "train"
    assert load_study(Path(__file__).parents[1] / "studies" / "googlenet-imagenet.toml").stimuli.split == "train"
    assert load_study(profile="default").stimuli.split == load_study(profile="quick").stimuli.split == "val"


def test_profile_quick_overrides_defaults_and_file_wins(tmp_path):
    quick = load_study(profile="quick")
    assert quick.study.profile == "quick"
    assert quick.data.train_per_class == PROFILES["quick"]["data"]["train_per_class"]
    study = tmp_path / "s.toml"
    study.write_text('[study]\nprofile = "quick"\nname = "mine"\n[train]\nepochs = 2\n')
    cfg = load_study(study, overrides=["train.lr=0.5"])
    assert (cfg.study.profile, cfg.study.name, cfg.train.epochs, cfg.train.lr) == ("quick", "mine", 2, 0.5)
    assert cfg.data.train_per_class == quick.data.train_per_class


def test_a_profile_set_as_a_setting_is_the_profile_not_only_its_name(tmp_path):
    """`--set study.profile=paper` on a quick study file resolves as `--profile paper` does: the paper profile's
    values under the file's own, so the recorded profile is the one used."""
    study = tmp_path / "s.toml"
    study.write_text('[study]\nprofile = "quick"\nname = "mine"\n[train]\nepochs = 2\n')
    by_setting = load_study(study, overrides=["study.profile=paper"])
    by_option = load_study(study, profile="paper")
    assert by_setting == by_option and by_setting.study.profile == "paper" and by_setting.train.epochs == 2
    assert by_setting.survey.main_trials == PROFILES["paper"].get("survey", {}).get("main_trials", 40) != \
        load_study(study).survey.main_trials
    with pytest.raises(ConfigError, match="unknown profile 'papr'"):
        load_study(study, overrides=["study.profile=papr"])


@pytest.mark.parametrize("text, fragment", [
    ("[trian]\nepochs = 3\n", "unknown section [trian]; did you mean 'train'? valid sections: ["),
    ("[train]\nepoch = 3\n", "unknown key train.epoch; did you mean 'epochs'? valid keys in [train]: ["),
    ('[train]\noptimizer = "lion"\n', "train.optimizer: 'lion' is not valid; choose from ['sgd', 'adam', 'adamw']"),
    ('[model]\narch = "vit"\n', "model.arch: 'vit' is not valid; choose from ['inception-small'"),
    ("[prune]\nrates = [0.5, 1.0]\n", "prune.rates: 1.0 is out of range; it must be below 1.0"),
    ('[prune]\nmethods = ["magic"]\n', "prune.methods: 'magic' is not valid; choose from ['unstructured-local'"),
    ('[train]\nepochs = "ten"\n', "train.epochs: expected an integer, got 'ten'"),
    ('[study]\ndevice = "gpu"\n', "study.device: 'gpu' is not valid; expected auto | cpu | cuda"),
    ('[data]\nsource = "folder"\n', "data.path: required when data.source = 'folder'"),
])
def test_bad_study_files_name_the_key_and_choices(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_study(path)
    assert fragment in str(err.value)


def test_overrides_parse_toml_values_and_reject_bad_form():
    assert parse_override("prune.rates=[0.1, 0.2]") == {"prune": {"rates": [0.1, 0.2]}}
    assert parse_override("model.arch=resnet50") == {"model": {"arch": "resnet50"}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("epochs=3")
    with pytest.raises(ConfigError, match="unknown key train.nope"):
        load_study(overrides=["train.nope=1"])


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown profile 'huge'; choose from \['default', 'paper', 'quick'\]"):
        load_study(profile="huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_study(tmp_path / "none.toml")


def test_describe_options_lists_every_key():
    text = describe_options()
    for section in dataclasses.fields(StudyConfig):
        assert f"[{section.name}]" in text
    assert "retrain_gamma = 0.9" in text


def test_show_options_gives_this_studys_values_and_the_built_in_defaults_beside_changed_ones():
    """`--show-options` with a profile and --set: each key's value in that study, and where the profile or the
    override changed it, the built-in default (read from the section's own defaults)."""
    from sparsight.config import StimuliSection

    cfg = load_study(None, "quick", ["train.lr=0.5"])
    lines, section = {}, ""
    for line in describe_options(cfg).splitlines():
        section = line.strip("[]") if line.startswith("[") else section
        if " = " in line:
            lines[f"{section}.{line.split(' = ')[0].strip()}"] = line
    built_in = StimuliSection().fv_steps
    assert cfg.stimuli.fv_steps != built_in
    assert lines["stimuli.fv_steps"].startswith(f"  fv_steps = {cfg.stimuli.fv_steps}    # ")
    assert lines["stimuli.fv_steps"].endswith(f"[built-in default: {built_in}]")
    assert lines["train.lr"].startswith("  lr = 0.5    # ") and "[built-in default:" in lines["train.lr"]
    assert "[built-in default" not in lines["prune.retrain_gamma"]
    assert "[built-in default" not in lines["study.output_dir"]          # only made absolute, not changed


def test_example_study_files_are_valid():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))
    assert len(files) >= 2
    for path in files:
        cfg = load_study(path)
        assert cfg.study.name == path.stem


def test_paths_that_enter_are_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    from sparsight.config import absolute_database_url, load_study, study_from_run_dir

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "studies" / "s.toml"
    study.parent.mkdir()
    study.write_text('[study]\nname = "s"\noutput_dir = "out"\n[data]\nsource = "folder"\npath = "images"\n'
                     '[model]\nweights = "IMAGENET1K_V1"\n[observer]\nweights = "w/observer.pt"\n'
                     '[dissection]\nprobe = "probe"\n[survey]\ndatabase = "sqlite:///db/survey.db"\n')
    cfg = load_study(study)
    assert cfg.study.output_dir == str(tmp_path / "out")            # the working directory, not the file's
    assert cfg.data.path == str(tmp_path / "images") and cfg.dissection.probe == str(tmp_path / "probe")
    assert cfg.observer.weights == str(tmp_path / "w" / "observer.pt")
    assert cfg.model.weights == "IMAGENET1K_V1"                     # a torchvision weights name stays a name
    assert cfg.survey.database == f"sqlite:///{tmp_path}/db/survey.db"
    assert cfg.run_dir == tmp_path / "out" / "s"
    assert absolute_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    moved = study_from_run_dir("elsewhere")                          # a study directory is where it is found
    assert moved.run_dir == tmp_path / "elsewhere" and moved.run_dir.is_absolute()


def test_missing_inputs_names_every_absent_file_the_study_reads_and_nothing_else(tmp_path, monkeypatch):
    from sparsight.config import missing_inputs

    monkeypatch.chdir(tmp_path)
    study = tmp_path / "s.toml"
    study.write_text('[study]\noutput_dir = "not-yet"\n[data]\nsource = "folder"\npath = "images"\n'
                     '[model]\nweights = "IMAGENET1K_V1"\n[observer]\nweights = "w/observer.pt"\n'
                     '[mis]\nembedding = "resnet50"\nembedding_weights = "IMAGENET1K_V2"\n'
                     '[dissection]\nprobe = "probe"\n[survey]\ndatabase = "sqlite:///db/survey.db"\n')
    assert missing_inputs(load_study(study)) == [f"data.path: {tmp_path / 'images'} does not exist",
                                                 f"observer.weights: {tmp_path / 'w' / 'observer.pt'} does not exist",
                                                 f"dissection.probe: {tmp_path / 'probe'} does not exist"]
    (tmp_path / "images").mkdir()
    (tmp_path / "probe").mkdir()
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "observer.pt").write_bytes(b"")
    assert missing_inputs(load_study(study)) == []     # outputs, databases and weights names are not inputs to find
    assert missing_inputs(StudyConfig()) == []


def test_mining_reads_files_with_the_studys_data_workers():
    from pathlib import Path

    from stimuli.pipeline import StimuliSettings

    gnet = load_study(Path(__file__).parents[1] / "studies" / "googlenet-imagenet.toml")
    assert StimuliSettings.from_config(gnet).num_workers == gnet.data.num_workers == 15
    assert StimuliSettings.from_config(load_study(overrides=["data.num_workers=0"])).num_workers == 0
