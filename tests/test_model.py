import pytest
import torch
import torch.nn.functional as F

from llmcli.formats import load_model
from llmcli.formats.ours import save_model, write_config
from llmcli.infer.generate import decode
from llmcli.infer.sampler import SamplingConfig
from llmcli.model.transformer import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=97, context=32, n_layer=2, n_head=4, n_embd=32)


def make_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(CONFIG).eval()


def test_changing_a_later_token_never_changes_earlier_logits():
    model = make_model()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % CONFIG.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cached_forward_in_chunks_matches_full_forward():
    model = make_model()
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_kv_cache(batch_size=3)
        chunks = [model(tokens[:, :10], pos=0), model(tokens[:, 10:11], pos=10), model(tokens[:, 11:], pos=11)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_equals_a_plain_loop_over_the_whole_sequence():
    """The engine (KV cache, left padding, NumPy steps) against model(tokens) on the whole sequence each token."""
    model = make_model(seed=3)
    prompts = [[5, 17, 42, 8], [5, 17, 42, 8], [9, 1]]
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.0)
    decoded = decode(model, prompts, cfg)
    for prompt, tokens in zip(prompts, decoded):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(25):  # 4 + 25 < context 32
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt):]


def test_generation_stops_at_the_context():
    model = make_model()
    cfg = SamplingConfig(max_new_tokens=1000, temperature=1.0, seed=0)
    assert len(decode(model, [[1, 2, 3]], cfg)[0]) == CONFIG.context - 3


def test_save_then_load_gives_identical_logits(tmp_path):
    from llmcli.text.tokenizer import train_tokenizer

    tok = train_tokenizer([f"word{i} token{i * 7} other{i % 13}" for i in range(2000)], tmp_path, vocab_size=300)
    config = ModelConfig(**{**vars(CONFIG), "vocab_size": tok.vocab_size})
    torch.manual_seed(7)
    model = Transformer(config).eval()
    save_model(tmp_path, model)
    write_config(tmp_path, {"model": vars(config)})
    loaded, _, _ = load_model(tmp_path)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))


LLAMA_STYLE = ModelConfig(vocab_size=97, context=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                          positions="rope", mlp="swiglu", intermediate_size=48, bias=False, tie_embeddings=False)
VARIANTS = {
    "llama-gqa": LLAMA_STYLE,
    "multi-query-qkv-bias-scaled-rope": ModelConfig(**{**vars(LLAMA_STYLE), "n_kv_head": 1, "qkv_bias": True,
                                                       "rope_scaling": 4.0, "rope_theta": 500.0}),
    "sinusoidal": ModelConfig(vocab_size=97, context=32, n_layer=2, n_head=2, n_embd=32, positions="sinusoidal"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_is_causal_and_its_cache_matches_a_full_forward(name):
    torch.manual_seed(0)
    model = Transformer(VARIANTS[name]).eval()
    tokens = torch.randint(0, 97, (2, 24))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 97
    with torch.no_grad():
        full = model(tokens)
        assert torch.equal(full[:, :12], model(changed)[:, :12])
        model.setup_kv_cache(batch_size=2)
        chunks = [model(tokens[:, :10]), model(tokens[:, 10:11], pos=10), model(tokens[:, 11:], pos=11)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_shrinks_the_cache_and_the_weights():
    model = Transformer(LLAMA_STYLE)
    full = Transformer(ModelConfig(**{**vars(LLAMA_STYLE), "n_kv_head": 0}))
    assert model.num_params() < full.num_params()
    model.setup_kv_cache(batch_size=1)
    assert model.blocks[0].attn.kv_cache.k.shape == (1, 2, 32, 8)
    assert "lm_head.weight" in model.state_dict() and "position_embedding.weight" not in model.state_dict()


@pytest.mark.parametrize("field, value", [("norm", "batchnorm"), ("positions", "alibi"), ("mlp", "relu"),
                                          ("n_kv_head", 3)])
def test_bad_choices_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**vars(LLAMA_STYLE), field: value})


def test_training_under_bfloat16_autocast_attends_short_sequences_in_float32():
    # SDPA's bfloat16 backward on a CPU costs 2-5x float32's at 64-128 tokens (llmcli/model/transformer.py)
    from llmcli.model.transformer import attention
    from llmcli.runtime import FP32_ATTENTION_MAX

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    in_float32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).bfloat16()
    in_bfloat16 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(in_float32, in_bfloat16)  # (else this test could not tell the two apart)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, None, True, 0.0, gqa=False, fp32_max=FP32_ATTENTION_MAX)
        with torch.no_grad():  # decoding and validation keep bfloat16's kernel: its forward pass is the faster
            assert torch.equal(attention(q, k, v, None, True, 0.0, gqa=False, fp32_max=FP32_ATTENTION_MAX), in_bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, in_float32)
    y.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
    long = torch.randn(1, 1, FP32_ATTENTION_MAX // 32 + 1, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # longer sequences keep bfloat16's kernel
        assert torch.equal(attention(long, long, long, None, True, 0.0, gqa=False, fp32_max=FP32_ATTENTION_MAX),
                           F.scaled_dot_product_attention(long, long, long, is_causal=True))


def test_the_engine_grows_its_cache_and_still_equals_the_plain_loop():
    """`llm generate` allocates its KV cache as rows and slots are needed (a long context's full cache for every
    row would be gigabytes): rows and slots grown mid-decode keep every row's tokens."""
    from llmcli.infer.engine import Engine

    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=97, context=600, n_layer=2, n_head=4, n_embd=32)).eval()
    assert Engine(model, None, max_batch=3, preallocate=False).max_len < 300  # (so that this test grows it)
    prompts = [[5, 17, 42, 8], [9, 1], list(range(20, 29))]
    decoded = decode(model, prompts, SamplingConfig(max_new_tokens=300, temperature=0.0))
    for prompt, tokens in zip(prompts, decoded):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(300):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert tokens == ids[len(prompt):]
