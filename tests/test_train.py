"""Pretraining that loses nothing: exact resume after SIGINT and SIGKILL, atomic checkpoints, disk full, non-finite
losses; gradient accumulation, schedules, and two processes under torchrun."""

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import ROOT, run_cli

from llmcli.config import TrainConfig
from llmcli.errors import LLMError
from llmcli.formats import load_model
from llmcli.model.transformer import ModelConfig, Transformer
from llmcli.train.checkpoints import checkpoint_dirs, checkpoint_tensors, load_train_state, save_checkpoint
from llmcli.train.loop import World, check_settings, train_step
from llmcli.train.optim import learning_rate, make_optimizer
from llmcli.train.pretrain import pretrain


def losses(run_dir) -> dict:
    """{(step, kind): loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], kind): r[kind] for r in rows for kind in ("train_loss", "val_loss") if kind in r}


def start_cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_until(condition, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.0005)
    raise AssertionError("timed out")


def last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()[:-1]] if path.exists() else []
    return max(steps, default=0)


def test_interrupt_and_kill_then_resume_repeats_the_uninterrupted_run(shakespeare_slice, nano_checkpoint, tmp_path):
    settings = dict(max_steps=20, eval_interval=10, save_interval=3, seed=5)
    reference = tmp_path / "reference"
    pretrain([str(shakespeare_slice)], reference, preset="nano", overrides=settings, tokenizer_path=nano_checkpoint)

    run = tmp_path / "run"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    first = start_cli("pretrain", shakespeare_slice, "--preset", "nano", "-t", nano_checkpoint, *options, "-o", run)
    stop_at = random.Random(19).randint(3, 6)  # seeded: a failure reruns the same way
    wait_until(lambda: last_step(run) >= stop_at, first)
    first.send_signal(signal.SIGINT)  # Ctrl-C: the step finishes, a checkpoint is saved, exit 130
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert f"continue with: llm pretrain --resume {run}" in stderr
    interrupted_at = checkpoint_dirs(run)[-1]
    assert int(interrupted_at.name.split("-")[1]) >= stop_at

    # SIGKILL while a checkpoint is being written (its temporary directory exists) after step 9
    second = start_cli("pretrain", "--resume", run)
    saving = lambda: any(int(p.name.split("-")[-1]) > 9 for p in (run / "checkpoints").glob(".tmp-step-*"))
    wait_until(saving, second)
    second.kill()
    second.wait()
    for directory in checkpoint_dirs(run):  # every complete checkpoint loads, the run directory too
        load_model(directory)
    load_model(run)

    third = run_cli("pretrain", "--resume", run)
    assert third.returncode == 0, third.stderr
    assert "resuming" in third.stderr
    assert losses(run) == losses(reference)  # bit for bit, every step's training and validation loss
    assert not list((run / "checkpoints").glob(".*"))  # the half-written checkpoint was cleared


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(shakespeare_slice, nano_checkpoint, tmp_path):
    run = tmp_path / "run"
    pretrain([str(shakespeare_slice)], run, preset="nano", overrides=dict(max_steps=6, eval_interval=3),
             tokenizer_path=nano_checkpoint)
    model, _, config = load_model(run)
    optimizer = make_optimizer(model, TrainConfig(**config["train"]))
    load_train_state(checkpoint_dirs(run)[-1], model, optimizer)
    config.pop("format")
    before = (run / "model.safetensors").read_bytes()

    # a file size limit makes writes fail like a full disk (EFBIG instead of ENOSPC), without touching the disk
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(LLMError, match=r"could not save the checkpoint of step 7 .*step-0000006\) is intact"):
            save_checkpoint(run, 7, *checkpoint_tensors(model, optimizer, torch.float32), config, {"step": 7},
                            keep_last=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000003", "step-0000006"]
    assert not list((run / "checkpoints").glob(".*"))
    assert (run / "model.safetensors").read_bytes() == before
    pretrain(None, None, overrides={"max_steps": 8}, resume=run)  # and the run goes on from it
    assert checkpoint_dirs(run)[-1].name == "step-0000008"


def _poison_step(monkeypatch, at_call: int, how: str):
    """Wrap train_step so that its call number at_call either runs on a model whose output is NaN (the loss becomes
    NaN: how='loss') or corrupts a weight after a good update (how='weights')."""
    from llmcli.train import loop

    real, calls = loop.train_step, []

    def step(model, *args, **kwargs):
        calls.append(1)
        if len(calls) != at_call:
            return real(model, *args, **kwargs)
        if how == "loss":
            hook = model.register_forward_hook(lambda module, inputs, output: output * float("nan"))
            try:
                return real(model, *args, **kwargs)
            finally:
                hook.remove()
        result = real(model, *args, **kwargs)
        with torch.no_grad():
            model.norm_f.weight[0] = float("inf")  # a weight that no loss has seen yet
        return result

    monkeypatch.setattr(loop, "train_step", step)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_checkpoints(shakespeare_slice, nano_checkpoint,
                                                                          tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_step(monkeypatch, 6, "loss")
    with pytest.raises(LLMError, match=r"the loss became nan at step 6; stopping: the last good checkpoint "
                                       r"\(.*step-0000005\) is kept.*lower learning rate"):
        pretrain([str(shakespeare_slice)], run, preset="nano", tokenizer_path=nano_checkpoint,
                 overrides=dict(max_steps=20, eval_interval=2, save_interval=1, keep_last=2, seed=3))
    # retention: the last two (4, 5) and the best by validation loss of the validated steps (2, 4)
    val = {step: loss for (step, kind), loss in losses(run).items() if kind == "val_loss" and step > 0}
    assert sorted(val) == [2, 4]
    expected = sorted({4, 5, min(val, key=val.get)})
    assert [int(p.name.split("-")[1]) for p in checkpoint_dirs(run)] == expected
    for directory in checkpoint_dirs(run):  # what was saved is finite
        model, _, _ = load_model(directory)
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_weights_are_never_saved(shakespeare_slice, nano_checkpoint, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_step(monkeypatch, 3, "weights")
    with pytest.raises(LLMError, match=r"the weights became non-finite at step 3; stopping"):
        pretrain([str(shakespeare_slice)], run, preset="nano", tokenizer_path=nano_checkpoint,
                 overrides=dict(max_steps=20, eval_interval=10, save_interval=1, seed=3))
    assert [p.name for p in checkpoint_dirs(run)] == ["step-0000001", "step-0000002"]
    assert not list((run / "checkpoints").glob(".*"))
    model, _, _ = load_model(run)  # the run's weights are step 2's, whole and finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_retention_keeps_the_last_and_the_best(tmp_path):
    """--keep-last N keeps the newest N checkpoints and the one of lowest validation loss, wherever it is."""
    (tmp_path / "tokenizer.model").write_bytes(b"tok")
    weights, state = {"w": torch.zeros(2)}, {"s": torch.zeros(1)}
    val_losses = {1: None, 2: 3.0, 3: None, 4: 1.0, 5: 2.0, 6: None, 7: 4.0, 8: None, 9: None}
    kept = []
    for step, val in val_losses.items():
        save_checkpoint(tmp_path, step, weights, state, {}, {"step": step, "val_loss": val}, keep_last=3)
        kept.append([int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path)])
    assert kept[3] == [2, 3, 4] and kept[4] == [3, 4, 5]
    assert kept[-1] == [4, 7, 8, 9]  # step 4 had the best validation loss
    save_checkpoint(tmp_path, 10, weights, state, {}, {"step": 10, "val_loss": None}, keep_last=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000004", "step-0000010"]


def test_micro_batches_give_the_update_of_one_large_batch():
    """With masked targets (prompts, padding) the micro-batches hold different numbers of tokens: the loss must be
    normalised by all the batch's tokens, not averaged over micro-batch means."""
    from contextlib import nullcontext

    from llmcli.train.loop import IGNORE

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=128, context=16, n_layer=2, n_head=2, n_embd=32)
    one, accumulated = Transformer(config), Transformer(config)
    accumulated.load_state_dict(one.state_dict())
    inputs = torch.randint(0, 128, (8, 16))
    targets = torch.randint(0, 128, (8, 16))
    targets[:2, :13] = IGNORE  # the first micro-batch has 6 targets, the others 32 each
    targets[5, 8:] = IGNORE
    # the reference: the mean over every target of the batch, written out
    reference = Transformer(config)
    reference.load_state_dict(one.state_dict())
    keep = targets != IGNORE
    expected_loss = torch.nn.functional.cross_entropy(reference(inputs)[keep], targets[keep]).item()
    results = []
    for model, splits in ((one, [slice(0, 8)]), (accumulated, [slice(i, i + 2) for i in range(0, 8, 2)])):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # an update proportional to the gradient
        batches = [(inputs[s], targets[s]) for s in splits]
        results.append(train_step(model, optimizer, batches, 0.5, 1e9, nullcontext(), World()))
    assert results[0][0] == pytest.approx(expected_loss, rel=1e-6)
    assert results[1][0] == pytest.approx(expected_loss, rel=1e-6)  # the loss
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)  # the gradient norm
    for a, b in zip(one.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(LLMError, match="micro-batch size .3. must divide"):
        check_settings(TrainConfig(batch_size=16, micro_batch_size=3), World())


def test_schedules():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1) and learning_rate(9, cfg) == pytest.approx(1.0)
    for schedule in ("cosine", "linear", "wsd"):
        cfg.schedule = schedule
        rates = [learning_rate(s, cfg) for s in range(101)]
        assert max(rates) == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
        assert all(a >= b - 1e-12 for a, b in zip(rates[9:], rates[10:]))  # never rises after warmup
    cfg.schedule, cfg.decay_fraction = "wsd", 0.2
    assert learning_rate(79, cfg) == 1.0 and learning_rate(90, cfg) == pytest.approx(0.55)
    assert learning_rate(55, TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, schedule="linear",
                                         min_lr_ratio=0.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_run_and_resume(strategy, shakespeare_slice, nano_checkpoint, tmp_path):
    settings = dict(max_steps=8, eval_interval=4, seed=2)
    reference = tmp_path / "one"
    pretrain([str(shakespeare_slice)], reference, preset="nano", overrides=settings, tokenizer_path=nano_checkpoint)
    options = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]

    two = tmp_path / "two"
    result = run_cli("pretrain", shakespeare_slice, "--preset", "nano", "-t", nano_checkpoint, *options, "-o", two,
                     "--nproc", "2", "--strategy", strategy)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(two)
    assert "on 2 processes" + (" (fsdp)" if strategy == "fsdp" else "") in result.stderr
    expected = losses(reference)
    assert losses(two).keys() == expected.keys()
    assert losses(two) == pytest.approx(expected, rel=1e-5)

    # a 1-process checkpoint at step 4, continued by 2 processes
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000008")
    result = run_cli("pretrain", "--resume", resumed, "--nproc", "2", "--strategy", strategy)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr and "from step 4" in result.stderr
    assert losses(resumed) == pytest.approx(expected, rel=1e-5)
    # and whole tensors on disk, whatever the strategy: the 2-process checkpoint loads in one process
    assert load_model(two)[0].num_params() == load_model(reference)[0].num_params()

    # an error that both processes meet is said once, without torchrun's report; it is refused before a strategy is
    # set up, so one strategy checks it (each 2-process start costs ~10 s of CPU)
    if strategy == "ddp":
        result = run_cli("pretrain", "--resume", resumed, "--max-steps", "9", "--lr", "1", "--nproc", "2")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [("llm: error: --resume keeps the run's settings; lr cannot change "
                                               "(only compile, eval_interval, keep_last, max_steps, "
                                               "micro_batch_size, save_interval, strategy, threads)")]
        # an error that process 0 alone meets (it prepares the data while the other waits): its one line, not the
        # other process's traceback of a barrier that lost its peer
        missing = tmp_path / "missing.model"
        result = run_cli("pretrain", shakespeare_slice, "-t", missing, "-o", tmp_path / "never", "--nproc", "2")
        assert result.returncode == 1
        assert result.stderr.splitlines() == [f"llm: error: no tokenizer at {missing}"]
        assert not (tmp_path / "never").exists()


def test_ctrl_c_under_two_processes_saves_the_step_and_says_where(shakespeare_slice, nano_checkpoint, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # a terminal's Ctrl-C: SIGINT to the foreground process group, `llm` and torchrun (which starts the training
    # processes in sessions of their own and passes it on)
    first = subprocess.Popen([sys.executable, "-m", "llmcli", "pretrain", str(shakespeare_slice), "--preset", "nano",
                              "-t", str(nano_checkpoint), "--max-steps", "1000", "--save-interval", "1000",
                              "--nproc", "2", "-o", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env, start_new_session=True)
    wait_until(lambda: last_step(run) >= 2, first)
    os.killpg(first.pid, signal.SIGINT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert f"continue with: llm pretrain --resume {run}" in stderr
    assert "Traceback" not in stderr and "death signal" not in stderr, stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint_dirs(run)[-1].name == f"step-{max(steps):07d}"  # the last step trained is saved

    # a closed terminal: SIGHUP to `llm` alone (torchrun, in a session of its own, is stopped by it, not left running)
    resumed = subprocess.Popen([sys.executable, "-m", "llmcli", "pretrain", "--resume", str(run), "--nproc", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_until(lambda: last_step(run) >= max(steps) + 2, resumed)
    resumed.send_signal(signal.SIGHUP)
    _, stderr = resumed.communicate(timeout=120)
    assert resumed.returncode == 130 and "llm: stopped by SIGHUP" in stderr, stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert checkpoint_dirs(run)[-1].name == f"step-{max(steps):07d}"


def test_resume_needs_a_run(tmp_path):
    result = run_cli("pretrain", "--resume", tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"llm: error: cannot resume: {tmp_path} has no config.yaml"] \
        or "is not a checkpoint" in result.stderr


def test_init_continues_pretraining_from_a_checkpoint(shakespeare_slice, nano_checkpoint, tmp_path):
    out = tmp_path / "continued"
    result = run_cli("pretrain", shakespeare_slice, "--init", nano_checkpoint, "--max-steps", "4",
                     "--eval-interval", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    start = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "val_loss" in line][0]
    trained = yaml.safe_load((nano_checkpoint / "config.yaml").read_text())
    assert start < trained["summary"]["first_val_loss"] - 1  # it starts where the checkpoint left off, not at random
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["init"] == str(nano_checkpoint) and config["model"]["n_embd"] == trained["model"]["n_embd"]
    assert (out / "tokenizer.model").read_bytes() == (nano_checkpoint / "tokenizer.model").read_bytes()
    clash = run_cli("pretrain", shakespeare_slice, "--init", nano_checkpoint, "-t", nano_checkpoint, "-o", tmp_path / "x")
    assert clash.returncode == 1 and "--init starts a new run" in clash.stderr


def test_a_run_directory_is_locked_while_a_run_writes_it(shakespeare_slice, nano_checkpoint, tmp_path):
    run = tmp_path / "run"
    first = start_cli("pretrain", shakespeare_slice, "--preset", "nano", "-t", nano_checkpoint, "--max-steps",
                      "100000", "--eval-interval", "100000", "--save-interval", "5", "-o", run)
    wait_until(lambda: last_step(run) >= 2, first)
    refusal = [f"llm: error: {run} is in use: another run is writing it; wait for that run to end (then --resume "
               "it), or choose another directory"]
    for second in (["pretrain", shakespeare_slice, "--preset", "nano", "-t", nano_checkpoint, "-o", run],
                   ["pretrain", "--resume", run, "--max-steps", "200000"]):
        result = run_cli(*second)
        assert result.returncode == 1 and result.stderr.splitlines() == refusal, result.stderr
    assert first.poll() is None  # the first run went on, untouched
    first.send_signal(signal.SIGINT)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, *range(1, len(steps))]  # one run's rows, in order
    assert checkpoint_dirs(run)[-1].name == f"step-{steps[-1]:07d}"
    resumed = run_cli("pretrain", "--resume", run, "--max-steps", str(steps[-1] + 2))  # the lock went with the run
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint_dirs(run)[-1].name == f"step-{steps[-1] + 2:07d}"


def test_a_lock_is_refused_while_held_and_free_after(tmp_path):
    from llmcli.train.run import locked

    with locked(tmp_path):
        with pytest.raises(LLMError, match="is in use"), locked(tmp_path):
            pass
        with locked(tmp_path, hold=False):  # the processes of a torchrun group but process 0
            pass
    with locked(tmp_path):  # released
        pass


def test_any_setting_by_set_is_typed_and_checked(shakespeare_slice, nano_checkpoint, tmp_path):
    run = tmp_path / "run"
    result = run_cli("pretrain", shakespeare_slice, "--preset", "nano", "-t", nano_checkpoint, "--max-steps", "2",
                     "--set", "train.warmup_steps=1", "--set", "train.beta2=0.99", "--set", "model.n_layer=1",
                     "--set", "train.lr=2e-3", "-o", run)
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["train"]["warmup_steps"], config["train"]["beta2"], config["train"]["lr"]) == (1, 0.99, 0.002)
    assert config["model"]["n_layer"] == 1
    for bad, message in (("train.warmup_step=5", "--set: unknown key 'train.warmup_step' (did you mean "
                                                 "'train.warmup_steps'?)"),
                         ("train.warmup_steps=many", "--set: 'train.warmup_steps' must be int, got 'many'"),
                         ("train.beta1=2", "beta1 (--beta1) must be between 0 and 1, not 2.0"),
                         ("train.schedule=step", "schedule must be one of cosine, linear, wsd, got 'step'"),
                         ("warmup_steps", "--set warmup_steps: expected SECTION.NAME=VALUE, e.g. --set train.warmup_steps=50")):
        refused = run_cli("pretrain", shakespeare_slice, "--set", bad, "-o", tmp_path / "never")
        assert refused.returncode == 1 and refused.stderr.splitlines() == [f"llm: error: {message}"], refused.stderr
    assert not (tmp_path / "never").exists()
    # a resume changes only what changes no result: one list, the fields' own
    refused = run_cli("pretrain", "--resume", run, "--set", "train.beta2=0.9")
    assert refused.returncode == 1 and "--resume keeps the run's settings; beta2 cannot change" in refused.stderr
    resumed = run_cli("pretrain", "--resume", run, "--set", "train.max_steps=3")
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint_dirs(run)[-1].name == "step-0000003"


def test_resume_whitelist_is_the_fields_own():
    from llmcli.config import RESUMABLE

    assert set(RESUMABLE) == {"max_steps", "eval_interval", "save_interval", "keep_last", "threads",
                              "micro_batch_size", "compile", "strategy"}
