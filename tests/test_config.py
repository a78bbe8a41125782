import subprocess
import sys

import pytest

from core.cli import build_parser
from core.config import ALLOWED_VALUES, DEFAULT_PRESET, DEVICES, PRESETS, ResolvedConfig, TrainConfig
from core.errors import LoupeError
from tests.conftest import ROOT


def test_config_round_trips_and_rejects_unknown_or_bad_settings():
    config = TrainConfig(strategy="finetune", epochs=3, label_smoothing=0.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(LoupeError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(LoupeError, match="strategy"):
        TrainConfig.from_dict({"strategy": "magic"})
    with pytest.raises(LoupeError, match="epochs"):
        TrainConfig.from_dict({"epochs": 0})
    assert PRESETS["quick"].strategy == "head" and PRESETS["thorough"].strategy == "two_stage"


def test_every_preset_is_a_valid_config_and_the_command_offers_exactly_the_presets():
    for config in PRESETS.values():
        config.validate()
    parser = build_parser()
    assert parser.parse_args(["train"]).preset == DEFAULT_PRESET
    for name in PRESETS:
        assert parser.parse_args(["train", "--preset", name]).preset == name
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--preset", "magic"])


def test_a_config_naming_a_gpu_is_valid_on_any_machine_and_reading_it_loads_no_torch():
    # Run apart, so this process's own imports cannot hide one.
    code = (
        "import sys; from core.config import ResolvedConfig, TrainConfig; "
        "TrainConfig(device='cuda').validate(); ResolvedConfig.from_dict({'device': 'mps', 'image_size': 288}); "
        "from core import jobs, selection; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    assert set(ALLOWED_VALUES["device"]) == set(DEVICES) >= {"cuda", "mps"}


def test_a_resolved_config_is_a_config_with_the_same_settings():
    resolved = ResolvedConfig.from_dict({**PRESETS["quick"].to_dict(), "image_size": 288, "device": "cpu"})
    assert isinstance(resolved, TrainConfig)
    assert resolved.to_dict() == {**PRESETS["quick"].to_dict(), "image_size": 288, "device": "cpu"}
    with pytest.raises(LoupeError, match="device"):
        ResolvedConfig.from_dict({"device": "tpu"})


@pytest.mark.parametrize("image_size, allowed", [(0, True), (31, False), (32, True), (1024, True), (1025, False),
                                                 (100_000, False), (-1, False)])
def test_the_input_size_is_chosen_from_the_photos_or_bounded(image_size, allowed):
    config = TrainConfig(image_size=image_size)
    if allowed:
        config.validate()
    else:
        with pytest.raises(LoupeError, match="image_size"):
            config.validate()
