"""`--quantize int8` (llmcli/quantize.py): int8 weights that compute nearly what the float32 model computes, on
every model configuration, with adapters merged first, from the CLI."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import run_cli
from test_numpy_model import CONFIGS, random_model

from llmcli.model.lora import add_lora
from llmcli.model.quantize import Int8Linear, quantize


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def test_an_int8_layer_computes_its_dequantized_weights_times_the_input():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Int8Linear(linear.weight, linear.bias)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    assert relative_error(dequantized, linear.weight) < 0.01  # int8 rounding (and bf16 scales) only
    x = torch.randn(3, 5, 64)
    assert relative_error(layer(x), x @ dequantized.T + linear.bias) < 0.01  # bf16 activations
    assert layer(x).shape == (3, 5, 48) and layer(x).dtype == torch.float32


@pytest.mark.parametrize("name", CONFIGS)
def test_a_quantized_model_gives_nearly_the_same_logits(name):
    model = random_model(**CONFIGS[name])
    quantized = quantize(copy.deepcopy(model), "int8")
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(quantized(tokens), model(tokens)) < 0.03
    for (path, before), after in zip(model.named_modules(), quantized.modules()):
        if isinstance(before, nn.Linear):  # layers whose input width the kernel cannot take stay float32
            assert isinstance(after, Int8Linear if before.in_features % 16 == 0 else nn.Linear), path
    assert isinstance(quantized.lm_head, Int8Linear)
    assert not quantized.config.tie_embeddings and model.config == random_model(**CONFIGS[name]).config


def test_adapters_are_merged_before_quantizing():
    model = random_model()
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=["attn.qkv", "mlp.fc"])
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_b"):
                module.lora_b.normal_(0, 0.1)  # an adapter that changes the output
        tokens = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
        expected = model(tokens)
        quantized = quantize(model, "int8")
        assert isinstance(quantized.blocks[0].attn.qkv, Int8Linear)
        assert relative_error(quantized(tokens), expected) < 0.03


def test_the_cli_quantizes_for_generate_and_eval(nano_checkpoint, shakespeare_slice, tmp_path):
    sample = tmp_path / "sample.txt"
    sample.write_text(shakespeare_slice.read_text(encoding="utf-8")[-20_000:], encoding="utf-8")
    scores = {}
    for options in ([], ["--quantize", "int8"]):
        result = run_cli("eval", sample, "-m", nano_checkpoint, "--json", *options)
        assert result.returncode == 0, result.stderr
        scores[len(options)] = json.loads(result.stdout)["bits_per_byte"]
    assert scores[2] != scores[0] and abs(scores[2] - scores[0]) < 0.01 * scores[0]
    result = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--quantize", "int8", "--seed", "1",
                     "--max-new-tokens", "12", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["new_tokens"] == 12 and record["finish_reason"] == "length" and record["text"]
    result = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--quantize", "int4")
    assert result.returncode == 1 and result.stderr == "llm: error: --quantize must be one of int8, not 'int4'\n"
