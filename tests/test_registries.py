"""The kernel's copies of registry names (for validating study files without torch) match the registries."""
import pytest

from pruning.methods import METHODS
from pruning.models import MODELS
from pruning.robustness import CORRUPTIONS
from pruning.schedule import SCHEDULES
from sparsight import config

REGISTRIES = {
    "models": (config.MODEL_NAMES, MODELS),
    "methods": (config.PRUNING_METHODS, METHODS),
    "schedules": (config.SCHEDULES, SCHEDULES),
    "corruptions": (config.CORRUPTIONS, CORRUPTIONS),
}


@pytest.mark.parametrize("config_names, registry", REGISTRIES.values(), ids=REGISTRIES.keys())
def test_config_names_equal_the_registry(config_names, registry):
    assert sorted(config_names) == sorted(registry)


def test_corruptions_keep_their_seed_order():
    """A corruption's position in the registry seeds its noise: reordering would change every result."""
    assert list(CORRUPTIONS) == ["gaussian_noise", "gaussian_blur", "contrast", "jpeg", "brightness", "shot_noise",
                                 "pixelate"]
