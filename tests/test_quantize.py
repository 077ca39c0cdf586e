"""`--quantize int8|int4` (llmcli/quantize.py): quantized weights that compute nearly what the float32 model computes,
on every model configuration, with adapters merged first, quantized while loading without a float32 copy, from the
CLI."""

import copy
import json
import sys

import pytest
import torch
import torch.nn as nn
from conftest import run_cli
from test_numpy_model import CONFIGS, random_model

from llmcli.formats import load_model
from llmcli.model.lora import add_lora
from llmcli.model.quantize import Int4Linear, Int8Embedding, Int8Linear, quantize


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


@pytest.mark.parametrize("block_rows", [16, 48, None])  # None: the whole matrix in one block
def test_an_int4_layer_computes_its_dequantized_weights_times_the_input(monkeypatch, block_rows):
    """Also when the matrix is quantized in several blocks of rows (as a large one is), which the kernel's packed
    layout only allows at its own block boundaries."""
    from llmcli.model import quantize as quantize_module

    if block_rows is not None:
        monkeypatch.setattr(quantize_module, "BLOCK_VALUES", block_rows * 64)
    torch.manual_seed(0)
    linear = nn.Linear(64, 144)
    with torch.no_grad():  # rows 1000x apart, and the two groups of a row 10x apart: scales per group are needed
        linear.weight.mul_(10.0 ** (torch.arange(144) % 4 - 2)[:, None])
        linear.weight[:, 32:] *= 10
    layer = Int4Linear(linear.weight, linear.bias)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 144 * 64 // 2  # two weights a byte
    x = torch.randn(3, 5, 64)
    assert relative_error(layer(x), linear(x)) < 0.1  # 16 levels a group of 32
    # the layer is its dequantized weights times the input: read them back through the kernel with x = identity
    dequantized = (layer(torch.eye(64)) - linear.bias).T
    for group, reference in zip(dequantized.reshape(-1, 32), linear.weight.reshape(-1, 32)):
        assert relative_error(group, reference) < 0.1
    groups = dequantized.reshape(144, 2, 32)
    assert all(len(group.unique()) <= 16 for group in groups.reshape(-1, 32))  # 4 bits a weight
    assert layer(x).shape == (3, 5, 144) and layer(x).dtype == torch.float32


def uneven(model):
    """Rows of every matrix 1000x apart in size, as real models have (outlier features): a scale shared by the
    whole matrix (per-tensor) would round the small rows to nothing, so the tests below catch it."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10.0 ** (torch.arange(p.size(0)) % 3 - 1)[:, None] * 0.3)
    return model


@pytest.mark.parametrize("mode, tolerance", [("int8", 0.03), ("int4", 0.2)])  # per-tensor scales: 0.2-0.9
@pytest.mark.parametrize("name", CONFIGS)
def test_a_quantized_model_gives_nearly_the_same_logits(name, mode, tolerance):
    model = uneven(random_model(**CONFIGS[name]))
    quantized = quantize(copy.deepcopy(model), mode)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(quantized(tokens), model(tokens)) < tolerance
    kind = Int8Linear if mode == "int8" else Int4Linear
    for (path, before), after in zip(model.named_modules(), quantized.modules()):
        if isinstance(before, nn.Linear) and path != "lm_head":  # layers the kernel cannot take stay float32
            takes = before.in_features % (16 if mode == "int8" else 32) == 0 and (
                mode == "int8" or before.out_features % 16 == 0)
            assert isinstance(after, kind if takes else nn.Linear), path
    assert model.config == random_model(**CONFIGS[name]).config  # (the copy's config changed, not the model's)
    # the output head is int8 in both modes (97 rows: int4's kernel could not take it anyway), a tied one sharing
    # the embedding's int8 rows
    assert isinstance(quantized.lm_head, Int8Linear) and isinstance(quantized.token_embedding, Int8Embedding)
    assert not quantized.config.tie_embeddings
    if model.config.tie_embeddings:
        assert quantized.lm_head.weight is quantized.token_embedding.weight


def llama_checkpoint(nano_checkpoint, out, **settings):
    """Our checkpoint of a random Llama-shaped model (rotary, SwiGLU, grouped-query, untied head) with the nano
    checkpoint's tokenizer: fused q/k/v and gate/up matrices that HF and GGUF files store in parts."""
    import shutil

    from llmcli.config import ModelConfig
    from llmcli.formats import ours
    from llmcli.model.transformer import Transformer

    config = ours.read_config(nano_checkpoint)
    config["model"] = dict(config["model"], norm="rmsnorm", positions="rope", mlp="swiglu", n_head=4, n_kv_head=2,
                           bias=False, tie_embeddings=False, intermediate_size=96, **settings)
    out.mkdir()
    torch.manual_seed(0)
    model = uneven(Transformer(ModelConfig(**config["model"])))
    ours.save_model(out, model)
    ours.write_config(out, {k: v for k, v in config.items() if k != "format"})
    shutil.copy(nano_checkpoint / "tokenizer.model", out)
    return out


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("form", ["ours", "llama", "hf gpt2", "hf llama", "gguf llama q8_0"])
def test_loading_quantized_equals_quantizing_the_loaded_model(nano_checkpoint, tmp_path, monkeypatch, form, mode):
    """load_model(quantize=...) quantizes each matrix a block of rows at a time as it is read (blocks of 128 rows
    here, across the q/k/v and gate/up parts of HF and GGUF files): the same model, exactly, as quantizing the
    float32 model, with no float32 matrix left."""
    from llmcli.formats import export_model
    from llmcli.model import quantize as quantize_module

    path = nano_checkpoint if "llama" not in form else llama_checkpoint(nano_checkpoint, tmp_path / "llama")
    if form.startswith("hf"):
        path = export_model(path, tmp_path / "hf", "hf")
    elif form.startswith("gguf"):
        path = export_model(path, tmp_path / "model.gguf", "gguf", "q8_0")
    monkeypatch.setattr(quantize_module, "BLOCK_VALUES", 128 * 64)  # (the matrices' width: 64)
    loaded, _, _ = load_model(path, quantize=mode)
    expected = quantize(load_model(path)[0], mode)
    assert isinstance(loaded.lm_head, Int8Linear)  # int8 in both modes
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected(tokens))
    assert not any(t.dtype == torch.float32 and t.ndim == 2 for t in [*loaded.parameters(), *loaded.buffers()]
                   if t.size(0) > 64)  # (the position table of a few rows is looked up, not multiplied)


PEAK_RSS = """
import sys
import torch
from llmcli.formats import load_model
from llmcli.model.quantize import quantize

def peak_rss():  # VmHWM: the process's own peak (ru_maxrss would count the RSS of the parent it was forked from)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))

load_model(sys.argv[3], quantize="int8")  # a small model first: imports and first calls are not measured
with open("/proc/self/clear_refs", "w") as f:  # Linux: the peak RSS starts again from the RSS of now
    f.write("5")
before = peak_rss()
if sys.argv[2] == "while reading":
    model = load_model(sys.argv[1], quantize="int8")[0]
else:
    model = quantize(load_model(sys.argv[1])[0], "int8")
print(peak_rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
def test_a_quantized_load_never_holds_the_float32_model(nano_checkpoint, tmp_path):
    """The peak memory of loading int8 grows by about the int8 weights, not by the float32 model's 67 MB: measured
    in a fresh process, against quantizing after a float32 load, which the measurement must tell apart."""
    import os
    import subprocess

    from conftest import ROOT

    path = llama_checkpoint(nano_checkpoint, tmp_path / "big", vocab_size=131072, n_layer=1)  # 2 x 8.4M weights
    float32_bytes = sum(t.numel() * 4 for t in load_model(path)[0].state_dict().values())
    assert float32_bytes > 67e6
    growth = {}
    for how in ("while reading", "after loading"):
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), how, str(nano_checkpoint)],
                                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr
        growth[how] = int(result.stdout)
    assert growth["after loading"] > 0.9 * float32_bytes, growth  # the float32 model was whole: the test can see it
    assert growth["while reading"] < 0.6 * float32_bytes, growth  # int8 (a quarter) and a block of rows: 0.42


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
    result = run_cli("generate", "ROMEO:", "-m", nano_checkpoint, "--quantize", "int3")
    assert result.returncode == 1 and result.stderr == "llm: error: --quantize must be one of int8, int4, not 'int3'\n"
