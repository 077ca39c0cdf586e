"""The shipped checkpoint: it loads, its files agree, it scores as its model card says, and sampling is seeded."""

import json
import re

import pytest

from conftest import ROOT, TINYSTORIES_VALID, run_cli
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
    first, second, other_seed = run_cli(*args), run_cli(*args), run_cli(*args[:3], "8", *args[4:])
    assert [r.returncode for r in (first, second, other_seed)] == [0, 0, 0], first.stderr + other_seed.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert other_seed.stdout.strip() and other_seed.stdout != first.stdout


def test_int8_costs_the_bits_per_byte_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"bits per\s+byte on TinyStories `valid.txt` go from ([0-9.]+) to ([0-9.]+)", readme).groups()
    for options, number in (([], stated[0]), (["--quantize", "int8"], stated[1])):
        result = run_cli("eval", TINYSTORIES_VALID, "--stride", "256", "--json", *options)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["bits_per_byte"] == pytest.approx(float(number), abs=0.0005)
