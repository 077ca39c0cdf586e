"""The shipped checkpoint: it loads, its files agree, it scores as its model card says, and sampling is seeded."""

import re

import pytest

from conftest import TINYSTORIES_VALID, run_cli
from llmcli.checkpoint import DEFAULT_MODEL, load_checkpoint


def test_default_checkpoint_loads_and_matches_its_card():
    model, tokenizer, config = load_checkpoint(None)
    assert model.num_params() == config["summary"]["parameters"]
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert "CDLA-Sharing-1.0" in card
    stated = float(re.search(r"bits per byte on `valid.txt`: ([0-9.]+)", card).group(1))
    from llmcli.evaluate import evaluate_file

    measured = evaluate_file(model, tokenizer, str(TINYSTORIES_VALID))["bits_per_byte"]
    assert measured == pytest.approx(stated, abs=0.005)  # a broken checkpoint or tokenizer would miss by far more


def test_default_generation_is_deterministic_for_a_seed():
    args = ("generate", "Tell me a story about a cat", "--seed", "7", "--max-new-tokens", "30")
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert run_cli(*args[:3], "8", *args[4:]).stdout != first.stdout
