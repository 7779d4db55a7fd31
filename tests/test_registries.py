"""Registries: the kernel's copies of registry names (for validating study files without torch) match
the registries, and the registry itself."""
import pytest

from pruning.methods import METHODS
from pruning.models import MODELS
from pruning.robustness import CORRUPTIONS
from pruning.schedule import SCHEDULES
from sparsight import config

REGISTRIES = {
    "models": (config.MODEL_NAMES, MODELS),
    "methods": (config.PRUNING_METHODS + (config.CONTROL_METHOD,), METHODS),
    "schedules": (config.SCHEDULES, SCHEDULES),
    "corruptions": (config.CORRUPTIONS, CORRUPTIONS),
}


def test_config_embedding_names_equal_what_the_embedding_factory_makes():
    from survey_app.embeddings import embedding_names
    assert sorted(config.EMBEDDING_NAMES) == embedding_names()


@pytest.mark.parametrize("config_names, registry", REGISTRIES.values(), ids=REGISTRIES.keys())
def test_config_names_equal_the_registry(config_names, registry):
    assert sorted(config_names) == sorted(registry)


def test_corruptions_keep_their_seed_order():
    """A corruption's position in the registry seeds its noise: reordering would change every result."""
    assert list(CORRUPTIONS) == ["gaussian_noise", "gaussian_blur", "contrast", "jpeg", "brightness", "shot_noise",
                                 "pixelate"]


def test_registry_registers_at_the_definition_and_lists_choices_on_a_bad_name():
    from sparsight.registry import Registry

    shapes = Registry("shape", error=KeyError, sorted_choices=False)

    @shapes.register("square")
    def square():
        return 4

    @shapes.register("circle", entry=lambda fn: ("spec", fn))
    def circle():
        return 0

    assert square() == 4 and shapes.lookup("square") is square and shapes.lookup("circle") == ("spec", circle)
    assert list(shapes) == ["square", "circle"]
    with pytest.raises(KeyError, match=r"unknown shape 'triangle'; choose from \['square', 'circle'\]"):
        shapes.lookup("triangle")
    with pytest.raises(ValueError, match="registered already"):
        shapes.register("square")(lambda: 1)
    with pytest.raises(KeyError, match=r"choose from \['square', 'circle'\]; did you mean 'square'\?"):
        shapes.lookup("squar")


def _choices(section: str, key: str) -> tuple:
    """The choices ``sparsight.config`` accepts for ``section.key``."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(type(getattr(config.StudyConfig(), section)))}
    return tuple(fields[key].metadata["choices"])


def _choice_lists():
    from pruning.training.engine import OPTIMIZERS, SCHEDULERS
    from stimuli.bank import KINDS
    from stimuli.featurevis import OBJECTIVES
    from stimuli.mining import PRECISIONS
    from stimuli.units import SAMPLINGS
    from survey_app.material import CONDITION_KEYS
    return {
        "train.optimizer": (_choices("train", "optimizer"), OPTIMIZERS),
        "train.scheduler": (_choices("train", "scheduler"), SCHEDULERS),
        "prune.retrain_optimizer": (_choices("prune", "retrain_optimizer"), OPTIMIZERS),
        "prune.retrain_scheduler": (_choices("prune", "retrain_scheduler"), SCHEDULERS),
        "units.sampling": (_choices("units", "sampling"), SAMPLINGS),
        "stimuli.fv_objective": (_choices("stimuli", "fv_objective"), OBJECTIVES),
        "stimuli.mining_precision": (_choices("stimuli", "mining_precision"), PRECISIONS),
        "stimuli.kinds": (config.STIMULUS_KINDS, KINDS),
        "survey.condition_by": (_choices("survey", "condition_by"), tuple(CONDITION_KEYS)),
    }


@pytest.mark.parametrize("setting", list(_choice_lists()))
def test_config_choices_equal_the_code_that_reads_them(setting):
    config_choices, code_choices = _choice_lists()[setting]
    assert sorted(config_choices) == sorted(code_choices)


@pytest.mark.parametrize("first", ["pruning.criteria", "pruning.magnitude", "pruning.methods", "pruning.schedule"])
def test_method_order_does_not_depend_on_which_module_is_imported_first(first):
    import subprocess
    import sys

    code = f"import {first}, pruning.methods; from pruning.method_base import METHODS; print(','.join(METHODS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ",".join(METHODS)
    assert out.stdout.startswith("unstructured-local,")
