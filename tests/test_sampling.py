import numpy as np
import pytest

from llmcli.errors import LLMError
from llmcli.infer.rows import TextStream
from llmcli.infer.sampler import SamplingConfig, apply_top_k, apply_top_p, sample_next


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


def test_top_p_breaks_ties_in_token_order():
    """Equal logits at the edge of the set: the earlier token is kept, in rows with and without ties alike."""
    logits = np.log([[0.4, 0.2, 0.2, 0.2], [0.1, 0.3, 0.3, 0.3], [0.45, 0.25, 0.2, 0.1]])
    assert np.isfinite(apply_top_p(logits, 0.55)).tolist() == [[True, True, False, False], [False, True, True, False],
                                                                [True, True, False, False]]
    with_inf = np.array([[2.0, -np.inf, 1.0, -np.inf, 1.0]])
    assert np.isfinite(apply_top_p(with_inf, 0.7)).tolist() == [[True, False, True, False, False]]


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
    from llmcli.text.tokenizer import Tokenizer

    tok = Tokenizer(nano_checkpoint)
    text = "a 🐱 é 日本"
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in tok.encode(text)] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# --- every sampling control at its edge values, on any logits ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st

EDGE_TEMPERATURES = [1e-300, 1e-6, 0.01, 1.0, 100.0, 1e300]


@st.composite
def logits_and_config(draw):
    vocab = draw(st.integers(1, 40))
    rows = draw(st.integers(1, 3))
    values = st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.sampled_from([0.0, 1.0, -1.0])  # ties likely
    logits = np.array(draw(st.lists(st.lists(values, min_size=vocab, max_size=vocab), min_size=rows,
                                    max_size=rows)), dtype=np.float32)
    cfg = SamplingConfig(
        temperature=draw(st.sampled_from(EDGE_TEMPERATURES) | st.floats(1e-3, 10.0)),
        top_k=draw(st.sampled_from([0, 1, 2, vocab - 1, vocab, vocab + 1]).filter(lambda k: k >= 0)),
        top_p=draw(st.sampled_from([1e-300, 0.5, 0.999999, 1.0]) | st.floats(0.01, 1.0)),
        min_p=draw(st.sampled_from([0.0, 1e-300, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        repetition_penalty=draw(st.sampled_from([1.0, 1e-3, 1.3, 1e3])))
    seen = np.array(draw(st.lists(st.lists(st.booleans(), min_size=vocab, max_size=vocab), min_size=rows,
                                  max_size=rows)))
    return logits, cfg, seen, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=150, deadline=None, database=None)
@given(logits_and_config())
def test_any_sampling_settings_draw_a_token_every_filter_allows(case):
    from llmcli.infer.sampler import apply_repetition_penalty

    logits, cfg, seen, seed = case
    cfg.check()
    tokens = sample_next(logits, cfg, rngs(seed, len(logits)), seen)
    penalized = apply_repetition_penalty(logits.astype(np.float64), seen, cfg.repetition_penalty)
    for row, token in zip(penalized, tokens):
        assert 0 <= token < len(row)
        higher = (row > row[token]).sum()
        if cfg.top_k:
            assert higher < cfg.top_k  # among the k largest
        if cfg.top_k == 1 or cfg.top_p == 1e-300:
            assert token == row.argmax()  # greedy: the first of the largest
        if cfg.min_p == 1.0 or cfg.temperature == 1e-300:
            assert row[token] == row.max()  # one of the largest
        # never a token of probability 0 at this temperature
        assert np.exp((row[token] - row.max()) / cfg.temperature) > 0 or row[token] == row.max()


@settings(max_examples=50, deadline=None, database=None)
@given(logits_and_config())
def test_top_k_1_is_greedy_at_any_temperature(case):
    logits, cfg, _, seed = case
    cfg.top_k, cfg.repetition_penalty = 1, 1.0
    assert np.array_equal(sample_next(logits, cfg, rngs(seed, len(logits))),
                          sample_next(logits, SamplingConfig(temperature=0), rngs(seed, len(logits))))


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", float("inf")),
                                          ("repetition_penalty", float("inf"))])
def test_non_finite_settings_are_rejected(field, value):
    with pytest.raises(LLMError, match=field.replace("_", "-")):
        SamplingConfig(**{field: value}).check()


def test_presence_and_frequency_penalties_are_openais():
    """logits[t] -= presence * (count[t] > 0) + frequency * count[t], over the generated tokens."""
    from llmcli.infer.sampler import apply_presence_frequency

    logits = np.array([[1.0, 2.0, 3.0, 4.0]])
    counts = np.array([[0, 1, 3, 0]])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    assert np.allclose(out, [[1.0, 2.0 - 0.5 - 0.25, 3.0 - 0.5 - 0.75, 4.0]])
    assert apply_presence_frequency(logits, counts, 0.0, 0.0) is logits
    assert apply_presence_frequency(logits, None, 1.0, 1.0) is logits


def test_logit_bias_and_ignore_eos_shape_the_draw():
    from llmcli.infer.sampler import apply_logit_bias, bias_vector

    cfg = SamplingConfig(temperature=0, logit_bias={2: 100.0, 0: -5.0})
    bias = bias_vector(cfg, 4)
    assert bias.tolist() == [-5.0, 0.0, 100.0, 0.0]
    logits = np.array([[0.0, 9.0, 0.0, 1.0]])
    assert np.allclose(apply_logit_bias(logits, bias), [[-5.0, 9.0, 100.0, 1.0]])
    assert sample_next(logits, cfg, [np.random.default_rng(0)], bias=bias[None]).tolist() == [2]
    # ignore_eos: the end token is never sampled, even when it is by far the most likely
    eos = SamplingConfig(temperature=1.0, ignore_eos=True)
    never = bias_vector(eos, 4, end_tokens=(1,))
    draws = [sample_next(logits, eos, [np.random.default_rng(s)], bias=never[None])[0] for s in range(50)]
    assert 1 not in draws
    assert bias_vector(SamplingConfig(), 4, end_tokens=(1,)) is None
    with pytest.raises(LLMError, match="vocabulary"):
        bias_vector(SamplingConfig(logit_bias={7: 1.0}), 4)
    with pytest.raises(LLMError, match="logit-bias"):
        SamplingConfig(logit_bias={1: 150.0}).check()
    with pytest.raises(LLMError, match="presence-penalty"):
        SamplingConfig(presence_penalty=3.0).check()


def test_log_softmax_is_the_models_distribution():
    from llmcli.infer.sampler import log_softmax

    logits = np.array([[1000.0, 999.0, -np.inf], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = log_softmax(logits)
    assert np.allclose(np.exp(out).sum(-1), 1.0)
    assert np.isclose(out[0, 0] - out[0, 1], 1.0) and out[0, 2] == -np.inf
    assert np.allclose(out[1], np.log(1 / 3))
