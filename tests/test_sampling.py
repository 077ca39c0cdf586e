import pytest
import torch

from llmcli.errors import LLMError
from llmcli.generate import SamplingConfig, TextStream, apply_top_k, apply_top_p, sample_next


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(apply_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(apply_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_top_p(logits, 0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(apply_top_p(logits, 1.0)).all()


def test_sampling_respects_filters_and_seed():
    logits = torch.randn(4, 50)
    cfg = SamplingConfig(temperature=1.0, top_k=3)
    allowed = torch.topk(logits, 3).indices
    draws = [sample_next(logits, cfg, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all((allowed == d[:, None]).any(dim=1).all() for d in draws)
    again = sample_next(logits, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(draws[0], again)
    assert torch.equal(sample_next(logits, SamplingConfig(temperature=0), None), logits.argmax(-1))


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
