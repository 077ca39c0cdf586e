"""The shipped checkpoint: it loads, its files agree, it scores as its model card says, and sampling is seeded."""

import re

from conftest import ROOT, TINYSTORIES_VALID, run_cli

from llmcli.formats import DEFAULT_MODEL, load_model


def test_default_checkpoint_loads_and_matches_its_card():
    model, tokenizer, config = load_model(None)
    assert model.num_params() == config["summary"]["parameters"]
    card = (DEFAULT_MODEL / "README.md").read_text()
    assert "CDLA-Sharing-1.0" in card
    stated = float(re.search(r"bits per byte on `valid.txt`: ([0-9.]+)", card).group(1))
    from llmcli.eval.evaluate import evaluate_file

    measured = evaluate_file(model, tokenizer, str(TINYSTORIES_VALID))["bits_per_byte"]
    assert abs(measured - stated) <= 6e-5  # the card's number, to its last digit


def test_default_generation_is_deterministic_for_a_seed():
    args = ("generate", "Tell me a story about a cat", "--seed", "7", "--max-new-tokens", "30")
    first, second, other_seed = run_cli(*args), run_cli(*args), run_cli(*args[:3], "8", *args[4:])
    assert [r.returncode for r in (first, second, other_seed)] == [0, 0, 0], first.stderr + other_seed.stderr
    assert first.stdout == second.stdout and first.stdout.strip()
    assert other_seed.stdout.strip() and other_seed.stdout != first.stdout


def test_int8_costs_the_bits_per_byte_the_readme_says():
    """docs/perf.md's numbers, to their last digit, on the whole file they name (the --quantize option of the CLI is
    tested on a slice in test_quantize.py)."""
    from llmcli.eval.evaluate import evaluate_file
    from llmcli.model.quantize import quantize

    readme = (ROOT / "docs" / "perf.md").read_text()
    stated = re.search(r"bits per\s+byte on TinyStories `valid.txt` go from ([0-9.]+) to ([0-9.]+)", readme).groups()
    model, tokenizer, _ = load_model(None)
    fp32 = evaluate_file(model, tokenizer, str(TINYSTORIES_VALID), stride=256)["bits_per_byte"]
    int8 = evaluate_file(quantize(model, "int8"), tokenizer, str(TINYSTORIES_VALID), stride=256)["bits_per_byte"]
    # to perf.md's last digit (it rounds half a unit of it; 0.00001 more for the summing order of other threads)
    assert abs(fp32 - float(stated[0])) <= 6e-5 and abs(int8 - float(stated[1])) <= 6e-5
    assert 0 < abs(int8 - fp32) < 0.0005  # int8 really ran, and cost little
