"""The training recipe: validation in bits per byte of text, and the Muon optimizer."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file
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


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_muon_trains_and_resumes_bit_for_bit(shakespeare_slice, nano_checkpoint, tmp_path):
    common = ("--preset", "nano", "-t", nano_checkpoint, "--max-steps", "12", "--eval-interval", "6",
              "--set", "train.optimizer=muon")
    whole, split = tmp_path / "whole", tmp_path / "split"
    trained = run_cli("pretrain", shakespeare_slice, *common, "-o", whole)
    assert trained.returncode == 0, trained.stderr
    val = [r["val_loss"] for r in metrics(whole) if "val_loss" in r]
    assert val[-1] < val[0] - 0.5  # it learns
    state = load_file(str(whole / "checkpoints" / "step-0000012" / "train_state.safetensors"))
    assert any(k.endswith("momentum_buffer") for k in state)  # Muon's state is saved (blocks' matrices)
    assert "optimizer.token_embedding.weight.exp_avg" in state  # and AdamW's

    # the checkpoint of step 6 continued to step 12 (the schedule depends on max_steps: the same run, resumed)
    shutil.copytree(whole, split)
    shutil.rmtree(split / "checkpoints" / "step-0000012")
    resumed = run_cli("pretrain", "--resume", split)
    assert resumed.returncode == 0, resumed.stderr
    assert "from step 6" in resumed.stderr
    assert [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in metrics(split)] == \
        [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in metrics(whole)]
    assert load_file(str(split / "model.safetensors")).keys() == load_file(str(whole / "model.safetensors")).keys()
    for name, tensor in load_file(str(split / "model.safetensors")).items():
        assert torch.equal(tensor, load_file(str(whole / "model.safetensors"))[name]), name


def test_muon_with_two_processes_ddp_and_fsdp_refused(shakespeare_slice, nano_checkpoint, tmp_path):
    common = ("--preset", "nano", "-t", nano_checkpoint, "--max-steps", "4", "--eval-interval", "4",
              "--set", "train.optimizer=muon")
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli("pretrain", shakespeare_slice, *common, "-o", one).returncode == 0
    result = run_cli("pretrain", shakespeare_slice, *common, "-o", two, "--nproc", "2")
    assert result.returncode == 0, result.stderr
    losses = lambda run: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in metrics(run)]
    assert [s for s, _, _ in losses(two)] == [s for s, _, _ in losses(one)]
    assert [x for _, *xs in losses(two) for x in xs if x is not None] == \
        pytest.approx([x for _, *xs in losses(one) for x in xs if x is not None], rel=1e-4)

    refused = run_cli("pretrain", shakespeare_slice, *common, "-o", tmp_path / "fsdp", "--nproc", "2",
                      "--strategy", "fsdp")
    assert refused.returncode != 0
    assert "muon does not go with fsdp" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "fsdp").exists()


def test_new_runs_get_the_modern_recipe_and_old_configs_keep_theirs(tmp_path):
    from llmcli.config import TrainConfig
    from llmcli.train.optim import learning_rate
    from llmcli.train.run import Run

    new = Run.new("tiny", None, {})
    assert (new.model.norm, new.model.positions, new.model.mlp, new.model.tie_embeddings, new.model.dropout) == \
        ("rmsnorm", "rope", "swiglu", False, 0.0)
    assert (new.train.schedule, new.train.decay_fraction, new.train.min_lr_ratio) == ("wsd", 0.65, 0.05)
    assert new.train.warmup == 100  # 5% of the preset's 2000 steps
    assert Run.new("tiny", None, {"train.warmup_steps": 7}).train.warmup == 7  # an explicit count wins
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  norm: layernorm\n  positions: learned\ntrain:\n  schedule: cosine\n")
    mine = Run.new(None, config, {})
    assert (mine.model.norm, mine.model.positions, mine.model.mlp, mine.train.schedule) == \
        ("layernorm", "learned", "swiglu", "cosine")
    assert learning_rate(0, TrainConfig(max_steps=100, warmup_steps=-1, warmup_fraction=0.1, lr=1.0)) == 0.1

    # a checkpoint written before the recipe changed states only what it set: the rest reads as it did then
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.yaml").write_text("format: llmcli-checkpoint/1\nmodel:\n  vocab_size: 64\n  n_layer: 1\n"
                                     "  n_head: 2\n  n_embd: 16\n  context: 16\ntrain:\n  max_steps: 10\n")
    old = Run.load(run)
    assert (old.model.norm, old.model.positions, old.model.mlp, old.model.tie_embeddings) == \
        ("layernorm", "learned", "gelu", True)
    assert (old.train.schedule, old.train.warmup, old.train.min_lr_ratio, old.train.optimizer) == \
        ("cosine", 100, 0.1, "adamw")
