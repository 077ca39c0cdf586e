"""The NumPy decoder (llmcli/numpy_model.py) computes what the torch model computes, and `llm generate` uses it for
a small checkpoint without importing torch."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from llmcli.formats import load_model
from llmcli.formats.ours import save_model, write_config
from llmcli.infer.generate import generate_samples
from llmcli.infer.sampler import SamplingConfig
from llmcli.infer.backend import NumpyBackend
from llmcli.model.batching import left_pad
from llmcli.model.numpy_model import NumpyTransformer, tensor_shapes
from llmcli.model.lora import add_lora, parse_targets
from llmcli.model.numpy_steps import TorchKernels, kv_cache_arrays, runs_on_numpy
from llmcli.model.quantize import quantize
from llmcli.model.transformer import ModelConfig, Transformer

CONFIGS = {
    "gpt2": dict(),
    "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False,
                  intermediate_size=100),
    "sinusoidal, qkv bias": dict(positions="sinusoidal", bias=False, qkv_bias=True),
    "multi-query, scaled rope": dict(positions="rope", rope_scaling=2.0, rope_theta=500.0, n_kv_head=1),
}


def random_model(**options) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, context=32, n_layer=2, n_head=4, n_embd=32, **options)).eval()
    with torch.no_grad():
        for p in model.parameters():  # away from the init (zero biases, unit norms), so every term shows
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_the_torch_model_in_prefill_and_every_cached_step(name):
    model = random_model(**CONFIGS[name])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == tensor_shapes(model.config)
    ours = NumpyTransformer(model.config, state)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens).numpy()
    rows = tokens.numpy()
    backend = NumpyBackend(ours)
    for prompts in ([rows[0, :7].tolist(), rows[1, :7].tolist()],
                    [rows[0, :7].tolist(), rows[1, 4:7].tolist()]):  # left-padded: row 1 starts 4 tokens later
        prompt, pad = left_pad(prompts)
        with torch.no_grad():
            expected = model(tokens, pad=torch.from_numpy(pad)).numpy()
        cache = backend.allocate(2, 12)
        np.testing.assert_allclose(backend.prefill(cache, prompt, 0, pad), expected[:, 6], atol=1e-5)
        for t in range(7, 12):
            np.testing.assert_allclose(backend.step(cache, rows[:, t], t, pad), expected[:, t], atol=1e-5)


@pytest.mark.parametrize("mode", [None, "int8", "int4", "lora"])
@pytest.mark.parametrize("name", CONFIGS)
def test_decode_steps_through_torch_kernels_give_the_torch_models_logits(name, mode):
    """`llm generate` prefills on torch, then steps with NumPy between the model's own modules (numpy_steps.py):
    float32, int8 and int4 layers, LoRA adapters, left-padded rows, the model's KV cache."""
    model = random_model(**CONFIGS[name])
    if mode == "lora":  # adapters that change the outputs (a fresh one adds zero)
        add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=parse_targets(None))
        for name_, p in model.named_parameters():
            if name_.endswith("lora_b"):
                torch.nn.init.normal_(p, std=0.1)
    elif mode is not None:
        quantize(model, mode)
    assert runs_on_numpy(model)
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([0, 4])  # row 1 starts 4 tokens later
    with torch.no_grad():
        expected = model(tokens, pad=pad).numpy()
        model.setup_kv_cache(2, 12)
        model(tokens[:, :7], pad=pad)
    steps, cache = TorchKernels(model), kv_cache_arrays(model.kv_caches())
    for t in range(7, 12):
        logits = steps.forward(tokens[:, t:t + 1].numpy(), t, cache, pad.numpy())
        np.testing.assert_allclose(logits, expected[:, t], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saved_checkpoint_samples_the_same_text_on_numpy_and_torch(nano_checkpoint, tmp_path, dtype):
    """Same seed, same text, whichever backend: the sampling is shared, the logits agree."""
    torch_model, tok, config = load_model(nano_checkpoint)
    save_model(tmp_path, torch_model, dtype=dtype)
    write_config(tmp_path, {k: v for k, v in config.items() if k != "format"})
    (tmp_path / "tokenizer.model").write_bytes((nano_checkpoint / "tokenizer.model").read_bytes())
    numpy_model, _, _ = load_model(tmp_path, numpy_if_small=True)
    torch_model, _, _ = load_model(tmp_path)
    assert isinstance(numpy_model, NumpyTransformer) and isinstance(torch_model, Transformer)
    cfg = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=50, num_samples=3, seed=7)
    texts = [[s.text for s in generate_samples(m, tok, ["ROMEO:"], cfg)] for m in (numpy_model, torch_model)]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3 and all(texts[0])


def test_generate_on_a_small_checkpoint_does_not_import_torch(nano_checkpoint):
    """One prompt or many (left-padded): NumPy; --quantize int8 needs torch's kernel."""
    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
            "from llmcli.cli import main; main()")
    for args, torch_used in ((["ROMEO:"], False), (["-", "--batch-size", "2"], False),
                             (["ROMEO:", "--quantize", "int8"], True)):
        result = subprocess.run([sys.executable, "-c", code, "generate", "-m", str(nano_checkpoint), "--seed", "1",
                                 "--max-new-tokens", "8", *args], input="ROMEO:\nJULIET:\n", capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() and result.stderr.strip().splitlines()[-1] == str(torch_used)
