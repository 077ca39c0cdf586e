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


def test_an_int8_layer_rounds_each_row_by_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():  # rows of very different sizes, as real layers have: one scale for all would not do
        linear.weight.mul_(torch.logspace(-2, 0, 48)[:, None])
    layer = Int8Linear(linear.weight, linear.bias)
    assert layer.weight.dtype == torch.int8 and layer.scales.dtype == torch.bfloat16
    # the specification, written out: a row's scale is its largest |w| / 127, and w / scale is rounded to nearest
    row_max = linear.weight.detach().abs().amax(dim=1)
    torch.testing.assert_close(layer.scales.float(), row_max / 127, rtol=2 ** -8, atol=0)
    assert torch.equal(layer.weight, torch.round(linear.weight.detach() / (row_max / 127)[:, None]).to(torch.int8))
    assert (layer.weight.abs().amax(dim=1) == 127).all()
    dequantized = layer.weight.float() * layer.scales.float()[:, None]
    # rounding errs by at most half a step a weight: about 0.4% here; truncation would err twice as much
    assert relative_error(dequantized, linear.weight) < 0.0055
    x = torch.randn(3, 5, 64)
    assert relative_error(layer(x), x @ dequantized.T + linear.bias) < 0.004  # bf16 activations
    assert relative_error(layer(x), linear(x)) < 0.0055
    assert layer(x).shape == (3, 5, 48) and layer(x).dtype == torch.float32


# The relative error of each random model's logits, measured with per-row rounding (0.010, 0.011, 0.0065, 0.011),
# with 15% to spare: one scale for the whole matrix (0.016, 0.018, 0.0092, 0.014) or truncation instead of rounding
# (0.020, 0.019, 0.011, 0.019) exceed every bound.
LOGIT_ERROR = {"gpt2": 0.0118, "llama": 0.0132, "sinusoidal, qkv bias": 0.0075, "multi-query, scaled rope": 0.0132}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_quantized_model_gives_nearly_the_same_logits(name):
    model = random_model(**CONFIGS[name])
    quantized = quantize(copy.deepcopy(model), "int8")
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(quantized(tokens), model(tokens)) < LOGIT_ERROR[name]
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
        assert relative_error(quantized(tokens), expected) < 0.0155  # measured 0.013; per tensor 0.020, truncated 0.024


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
