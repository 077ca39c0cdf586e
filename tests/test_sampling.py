import numpy as np
import pytest

from llmcli.errors import LLMError
from llmcli.generate import SamplingConfig, TextStream, apply_top_k, apply_top_p, sample_next


def test_top_k_keeps_the_k_largest():
    logits = np.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = np.isfinite(apply_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert np.array_equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log([[0.5, 0.3, 0.15, 0.05]])
    assert np.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert np.isfinite(apply_top_p(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert np.isfinite(apply_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert np.isfinite(apply_top_p(logits, 1.0)).all()


def rngs(seed, rows=4):
    return [np.random.default_rng([seed, row]) for row in range(rows)]


def test_sampling_respects_filters_and_seed():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    allowed = np.argsort(-logits, axis=-1)[:, :3]
    draws = [sample_next(logits, cfg, rngs(s)) for s in range(20)]
    assert all((allowed == d[:, None]).any(axis=1).all() for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # really random
    assert np.array_equal(draws[0], sample_next(logits, cfg, rngs(0)))
    assert np.array_equal(sample_next(logits, SamplingConfig(temperature=0), rngs(0)), logits.argmax(-1))


def test_sampling_follows_the_probabilities():
    logits = np.array([[np.log(0.6), np.log(0.3), np.log(0.1), -np.inf]])
    counts = np.bincount([sample_next(logits, SamplingConfig(temperature=1.0), rngs(s, 1))[0] for s in range(3000)],
                         minlength=4)
    assert np.allclose(counts / 3000, [0.6, 0.3, 0.1, 0.0], atol=0.03) and counts[3] == 0


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """p_i proportional to p_i^(1/T): at T=0.5 the probabilities 0.6, 0.3, 0.1 become 0.783, 0.196, 0.022."""
    probabilities = np.array([0.6, 0.3, 0.1])
    logits = np.log(probabilities)[None]
    counts = np.bincount([sample_next(logits, SamplingConfig(temperature=temperature), rngs(s, 1))[0]
                          for s in range(3000)], minlength=3)
    expected = probabilities ** (1 / temperature) / (probabilities ** (1 / temperature)).sum()
    assert np.allclose(counts / 3000, expected, atol=0.03), (counts / 3000, expected)


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
                                          ("num_samples", 0)])
def test_bad_sampling_settings_are_rejected(field, value):
    with pytest.raises(LLMError, match=field.replace("_", "-")):
        SamplingConfig(**{field: value}).check()


def test_text_stream_never_emits_half_a_character(nano_checkpoint):
    from llmcli.tokenizer import Tokenizer

    tok = Tokenizer(nano_checkpoint)
    text = "a 🐱 é 日本"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
