import pytest
import torch

from llmcli.config import PRESETS, resolve_run_config
from llmcli.errors import LLMError
from llmcli.model.transformer import ModelConfig, Transformer


@pytest.mark.parametrize("preset, low, high", [("tiny", 0.8e6, 1.5e6), ("small", 8e6, 14e6), ("gpt2", 123e6, 125e6)])
def test_preset_sizes(preset, low, high):
    with torch.device("meta"):
        n = Transformer(ModelConfig(**PRESETS[preset]["model"])).num_params()
    assert low <= n <= high


def test_precedence_preset_then_file_then_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: nano\nmodel: {n_layer: 3}\ntrain: {lr: 1e-2, max_steps: 7}\n")
    run = resolve_run_config(None, path, {"max_steps": 9, "context": 32, "batch_size": None})
    assert run["preset"] == "nano"
    assert run["model"]["n_layer"] == 3 and run["model"]["n_embd"] == PRESETS["nano"]["model"]["n_embd"]
    assert run["model"]["context"] == 32
    assert run["train"]["lr"] == 0.01 and run["train"]["max_steps"] == 9
    assert run["train"]["batch_size"] == PRESETS["nano"]["train"]["batch_size"]


@pytest.mark.parametrize("text, message", [
    ("train: {learning_rate: 0.1}\n", "unknown key 'train.learning_rate'"),
    ("model: {n_layers: 2}\n", "did you mean 'model.n_layer'"),
    ("train: {max_steps: ten}\n", "'train.max_steps' must be int"),
    ("train: {max_steps: 1.5}\n", "'train.max_steps' must be int"),
    ("model: {bias: 1}\n", "'model.bias' must be bool"),
    ("optimizer: {}\n", "unknown key 'optimizer'"),
    ("generation: {temprature: 0.5}\n", "did you mean 'generation.temperature'"),
    ("- a\n- b\n", "expected a mapping"),
    ("model: [\n", "not valid YAML"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(LLMError, match=message.replace("(", r"\(")):
        resolve_run_config(None, path, {})


def test_unknown_preset():
    with pytest.raises(LLMError, match="unknown preset 'huge'"):
        resolve_run_config("huge", None, {})


def test_stored_generation_defaults_yield_to_options():
    from llmcli.infer.generate import apply_template
    from llmcli.infer.sampler import sampling_settings

    stored = {"generation": {"temperature": 0.5, "max_new_tokens": 9, "prompt_template": "{prompt}\n"}}
    cfg, template = sampling_settings(stored, temperature=0.0, top_p=None, num_samples=2)
    assert (cfg.temperature, cfg.max_new_tokens, cfg.top_p, cfg.num_samples) == (0.0, 9, 1.0, 2)
    assert apply_template(template, "Tell me a story") == "Tell me a story\n"
    assert apply_template(template, "") == ""
    assert sampling_settings({}, temperature=None)[1] == "{prompt}"
