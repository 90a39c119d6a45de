"""gin registration: the bindings train.py documents exist under these names, recipes parse, errors name the binding."""

import gin
import pytest

from mllm_jax import gin_setup
from mllm_jax.config import LLMConfig, ModelConfig, VisionConfig
from mllm_jax.train.config import DataConfig, TrainConfig
from mllm_jax.parallel.config import ParallelConfig

RECIPES = ["vlm_tiny", "vlm_tiny_frozen", "valm_tiny", "llava_7b", "valm_s", "vlm_small"]


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def test_required_bindings_exist_and_take_effect():
    params = {
        "TrainConfig.steps": 7, "TrainConfig.checkpoint_every": 3, "TrainConfig.log_every": 2, "TrainConfig.seed": 5,
        "ParallelConfig.data": 2, "ParallelConfig.fsdp": 3, "ParallelConfig.tensor": 4, "ParallelConfig.pipeline": 5,
        "ParallelConfig.context": 6, "ParallelConfig.microbatches": 7,
    }
    gin_setup.parse([], [f"{k} = {v}" for k, v in params.items()])
    built = {"TrainConfig": gin_setup.build(TrainConfig), "ParallelConfig": gin_setup.build(ParallelConfig)}
    for key, value in params.items():
        cls, field = key.split(".")
        assert getattr(built[cls], field) == value, key
    assert type(built["ParallelConfig"]) is ParallelConfig  # resolved to the plain class


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_parse_into_plain_configs(recipe):
    gin_setup.parse([f"configs/{recipe}.gin"])
    model = gin_setup.build(ModelConfig)
    assert type(model) is ModelConfig and type(model.llm) is LLMConfig
    assert all(type(e).__name__ in ("VisionConfig", "AudioConfig") for e in model.encoders.values())
    data = gin_setup.build(DataConfig)
    assert data.seq_len > 0 and set(model.placeholder_ids) == set(model.encoders)


def test_tiny_recipe_meets_the_layout_requirements():
    gin_setup.parse(["configs/vlm_tiny.gin"])
    model, data = gin_setup.build(ModelConfig), gin_setup.build(DataConfig)
    assert model.llm.n_layers >= 8 and data.seq_len % 256 == 0 and data.batch_size % 16 == 0
    gin.clear_config()
    gin_setup.parse(["configs/vlm_tiny_frozen.gin"])
    frozen = gin_setup.build(ModelConfig)
    assert not frozen.is_trainable("encoders/vision") and not frozen.is_trainable("llm")
    assert frozen.is_trainable("projectors/vision")


def test_overrides_win_over_the_recipe():
    gin_setup.parse(["configs/vlm_tiny.gin"], ["LLMConfig.n_layers = 2", "VisionConfig.image_size = 16"])
    model = gin_setup.build(ModelConfig)
    assert model.llm.n_layers == 2 and model.encoders["vision"] == VisionConfig(**{
        **model.encoders["vision"].__dict__, "image_size": 16})


def test_unknown_bindings_are_errors_naming_them():
    with pytest.raises(ValueError, match="TrainConfig.*no_such_field|no_such_field"):
        gin_setup.parse([], ["TrainConfig.no_such_field = 1"])
    with pytest.raises(ValueError, match="NoSuchConfig"):
        gin_setup.parse([], ["NoSuchConfig.steps = 1"])


def test_a_second_parse_starts_from_the_defaults():
    """Each parse describes one whole run: a binding of an earlier parse in the same process does not leak into the
    next (compile_targets and tests build several run configs in one process)."""
    from mllm_jax.parallel.config import ContextConfig
    from mllm_jax.train import loop

    first = loop.load_run_config(["configs/vlm_tiny.gin"], ["ParallelConfig.context=4", 'ContextConfig.attention="ring"'])
    assert first.parallel.context == 4 and first.parallel.context_config.attention == "ring"
    second = loop.load_run_config(["configs/vlm_tiny.gin"], [])
    assert second.parallel.context == 1 and second.parallel.context_config == ContextConfig()
