import dataclasses

import pytest

import llmcomp.quant  # noqa: F401  (registers every method config)
from llmcomp.core.config import CONFIGS, from_json, to_json
from llmcomp.errors import UserError
from llmcomp.core.select import select
from llmcomp.quant.presets import PRESETS


@pytest.mark.parametrize("name", CONFIGS.names())
def test_every_registered_config_round_trips(name):
    cls = CONFIGS.get(name)
    obj = cls()
    assert dataclasses.is_dataclass(obj)
    back = from_json(to_json(obj))
    assert back == obj and type(back) is cls
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(obj)[0].name, None)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip(name):
    assert from_json(to_json(PRESETS[name])) == PRESETS[name]


def test_unknown_type_and_newer_version_rejected():
    with pytest.raises(UserError, match="Unknown config type"):
        from_json('{"_type": "os.system", "_version": 1}')
    with pytest.raises(UserError, match="newer"):
        from_json('{"_type": "Uniform", "_version": 99, "bits": 4}')


def test_selector_patterns(tiny_model):
    names = [n for n, _ in select(tiny_model, ["Linear"], ["lm_head"])]
    assert len(names) == 2 * 7 and "lm_head" not in names
    down = [n for n, _ in select(tiny_model, ["mlp.down_proj"], [])]
    assert down == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    layer0 = [n for n, _ in select(tiny_model, [r"re:.*layers\.0\..*proj"], ["re:.*mlp.*"])]
    assert layer0 == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    with pytest.raises(UserError, match="Invalid layer pattern"):
        list(select(tiny_model, ["re:("], []))


@pytest.mark.parametrize("container,left", [("mlp", 2 * 4), ("self_attn", 2 * 3), ("layers.1", 7), ("LlamaMLP", 8)])
def test_ignoring_a_container_ignores_its_layers(tiny_model, container, left):
    """An ignore pattern matched only the container module itself: its linears were quantized anyway."""
    names = [n for n, _ in select(tiny_model, ["Linear"], ["lm_head", container])]
    assert len(names) == left, names
