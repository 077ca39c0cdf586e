"""The training recipe: validation in bits per byte of text, and the Muon optimizer."""

import json

import pytest
import yaml
from conftest import ROOT, run_cli

STORIES = ROOT / "data" / "tinystories"


def test_validation_in_bits_per_byte_agrees_with_llm_eval(tmp_path):
    run = tmp_path / "run"
    trained = run_cli("pretrain", STORIES / "train.txt", "--preset", "nano", "--max-steps", "60", "-o", run)
    assert trained.returncode == 0, trained.stderr
    assert "bits per byte" in trained.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    bpb = [r["val_bpb"] for r in rows if "val_loss" in r]
    assert len(bpb) == len([r for r in rows if "val_loss" in r]) and bpb[-1] < bpb[0]
    summary = yaml.safe_load((run / "config.yaml").read_text())["summary"]
    assert summary["val_bpb"] == pytest.approx(bpb[-1])
    # the held-out stories of valid.txt are other stories of the same kind: the same bits per byte within a few %
    scored = run_cli("eval", "-m", run, STORIES / "valid.txt", "--stride", "64", "--json")
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["bits_per_byte"] == pytest.approx(bpb[-1], rel=0.05)

    drawn = run_cli("plot", run, "-o", tmp_path / "loss.png")
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
