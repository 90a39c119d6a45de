"""train.py on real files: a tiny LLaVA-JSON dataset (PNG images written with PIL, a tokenizer.json written with
`tokenizers`) trains with a finite, falling loss, logs the bad record it skipped, and resumes exactly (the loader's
position is in the checkpoint); the same dataset trains configs/llava_pretrained.gin from tiny random Hugging Face
checkpoints written with transformers, whose frozen LLM weights come through training unchanged."""

import json
import os

import numpy as np
import pytest

from tests.train_main import TINY, losses, run_main

COLOURS = {"red": (230, 20, 20), "green": (20, 220, 20), "blue": (30, 40, 240), "yellow": (240, 230, 20)}
SHAPES = ("square", "circle")
STEPS = 4


def write_llava_dataset(root) -> tuple[str, str]:
    """16 good records (a coloured shape, its caption in the synthetic vocabulary) and one whose image is missing;
    returns (the JSON path, the tokenizer.json path)."""
    from PIL import Image, ImageDraw

    from mllm_jax.data.tokenizer import build_tokenizer

    os.makedirs(root / "images", exist_ok=True)
    records = []
    for i in range(16):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        img = Image.new("RGB", (16, 16), (20, 20, 20))
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)([3, 3, 12, 12], fill=COLOURS[colour])
        img.save(root / "images" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image> describe the image ."},
            {"from": "gpt", "value": f"a {colour} {shape} at the middle center"}]})
    records.append({"id": "missing", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image> describe the image ."}, {"from": "gpt", "value": "a red square"}]})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    tokenizer = root / "tokenizer.json"
    build_tokenizer().save(str(tokenizer))
    return str(path), str(tokenizer)


def dataset_params(json_path: str, tokenizer: str) -> list:
    return [
        f'DatasetConfig.path = "{json_path}"', f'DatasetConfig.media_root = "{os.path.dirname(json_path)}/images"',
        'DatasetConfig.format = "llava"', "DatasetConfig.global_batch_samples = 8",
        "DatasetConfig.rows_per_microbatch = 1", "DatasetConfig.seq_len_buckets = (64,)",
        "DatasetConfig.instance_buckets = (1,)", "DatasetConfig.num_workers = 1",
        f'DataConfig.tokenizer_path = "{tokenizer}"', "ParallelConfig.data = 8",
    ]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava"))


@pytest.mark.slow
def test_llava_json_trains_logs_bad_samples_and_resumes_exactly(dataset, tmp_path):
    params = TINY + dataset_params(*dataset) + [f"TrainConfig.steps = {STEPS}", "TrainConfig.checkpoint_every = 100",
                                                "OptimizerConfig.learning_rate = 1e-2"]
    full = run_main(str(tmp_path / "full"), params)
    assert [r["step"] for r in full] == list(range(1, STEPS + 1))
    loss = [r["loss"] for r in full]
    assert all(np.isfinite(loss)) and loss[-1] < loss[0]
    assert "eval_loss" not in full[-1]  # real data: training loss only
    # The missing image is found while planning (every host alike), counted and logged: 32 good samples drawn from
    # 17 records pass it once or twice, depending on where the shuffle puts it.
    assert set(full[-1]["bad_samples"]) == {"missing_file"} and full[-1]["bad_samples"]["missing_file"] >= 1

    resumed = str(tmp_path / "resumed")
    run_main(resumed, params + ["TrainConfig.stop_at_step = 2"])
    again = run_main(resumed, params)
    assert losses(again) == losses(full)  # bitwise: the loader continued at the checkpointed position
    assert again[-1]["bad_samples"] == full[-1]["bad_samples"]


@pytest.mark.slow
def test_llava_pretrained_recipe_trains_from_hf_directories(dataset, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=128)).eval()
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8)).eval()
    llama.save_pretrained(str(tmp_path / "llm"))
    clip.save_pretrained(str(tmp_path / "clip"))
    workdir = str(tmp_path / "run")
    params = dataset_params(*dataset) + [
        f'PretrainedConfig.llm = "{tmp_path / "llm"}"',
        f'PretrainedConfig.encoders = {{"vision": "{tmp_path / "clip"}"}}',
        'ModelConfig.placeholder_ids = {"vision": 3}',  # <image> of the test's tokenizer
        'ModelConfig.dtype = "float32"', "LoRAConfig.rank = 4", "TrainConfig.steps = 2",
        "TrainConfig.log_every = 1", "TrainConfig.progress_bar = False", "CheckpointConfig.async_save = False",
        "OptimizerConfig.warmup_steps = 1",
    ]
    rows = run_main(workdir, params, gin_file="configs/llava_pretrained.gin")
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)

    # Oracle: the checkpoint's (frozen, LoRA'd) LLM embedding and the (frozen) tower's patch embedding are the
    # Hugging Face weights; the fresh projector trained.
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "2", "state"))
    llm = state["model"]["llm"]
    np.testing.assert_array_equal(np.asarray(llm["embed"]["embedding"]),
                                  llama.model.embed_tokens.weight.detach().numpy())
    with open(os.path.join(workdir, "run_config.json")) as f:
        run_config = json.load(f)
    assert run_config["model"]["llm"]["d_model"] == 32 and run_config["model"]["encoders"]["vision"]["d_model"] == 16
