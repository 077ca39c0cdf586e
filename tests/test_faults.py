"""Faults, full disks and hostile files, through the CLI (issue 16): kills leave nothing running and nothing
half-written, a full or read-only disk and a malformed file are one line on stderr, never a traceback.

Full and read-only disks are tmpfs mounts (16 KB), which need root: CI runs as root; elsewhere those tests skip and
say why. Killed runs are watched through /proc (Linux)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, SHAKESPEARE, TINYSTORIES_TRAIN, run_cli

from llmcli.formats import DEFAULT_MODEL


def one_line_error(result, *fragments):
    """Exit 1 and one line on stderr, llm: error: ..., holding the fragments; no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@contextmanager
def tmpfs(path: Path, size: str = "16k"):
    """A small tmpfs mounted at path (root only): yield a function that remounts it read-only."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs mount needs root and mount(8); CI runs as root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# --- 1. kills ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_kill_during_tokenization_leaves_no_worker_and_no_temporary_folder(sig, tmp_path):
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        pytest.skip("needs /proc/PID/task/TID/children (Linux) to find the tokenizer's workers")
    corpus = tmp_path / "corpus.txt"  # over two chunks of a megabyte: tokenized by a pool of workers
    text = TINYSTORIES_TRAIN.read_bytes() + SHAKESPEARE.read_bytes()
    corpus.write_bytes(text * (3_000_000 // len(text) + 1))
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_CACHE_DIR": str(cache)}
    llm = subprocess.Popen([sys.executable, "-m", "llmcli", "pretrain", str(corpus), "-t", DEFAULT_MODEL, "--preset", "nano",
                            "--max-steps", "5", "-o", str(tmp_path / "run")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    workers = []
    try:
        deadline = time.monotonic() + 300
        while len(workers) < 2 and time.monotonic() < deadline and llm.poll() is None:
            workers = children(llm.pid)
            time.sleep(0.002)
        assert len(workers) >= 2, f"no pool of workers seen: {llm.communicate()[1]}"
        assert list((cache / "tokens").glob(".tmp-*")), "the kill must land during tokenization"
        llm.send_signal(sig)
        # the workers held the caller's stdout and stderr open: communicate() never returned
        _, stderr = llm.communicate(timeout=120)
        deadline = time.monotonic() + 30
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(running, workers)), "a tokenizer worker outlived its parent"
    finally:
        for pid in workers:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGTERM:  # as Ctrl-C: cleaned up, said, 130
        assert llm.returncode == 130 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr
        assert not list((cache / "tokens").glob(".tmp-*"))
    else:  # nothing could clean up; the next run (or llm cache --clear) removes what the dead process left
        assert llm.returncode == -signal.SIGKILL
        assert list((cache / "tokens").glob(".tmp-*"))
        cleared = run_cli("cache", "--clear", env={"LLM_CACHE_DIR": str(cache)})
        assert cleared.returncode == 0, cleared.stderr
        assert not list((cache / "tokens").glob(".tmp-*"))


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path):
    from llmcli.text.data import read_lines
    from llmcli.text.shards import cached_tokens, remove_stale_temporaries
    from llmcli.text.tokenizer import train_tokenizer

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tokens = tmp_path / "cache" / "tokens"
    stale, old_style, alive = (tokens / f".tmp-{'a' * 32}-{os.uname().nodename}-{dead.pid}",
                               tokens / f".tmp-{'b' * 32}-{dead.pid}", tokens / f".tmp-{'c' * 32}-{os.getppid()}")
    for path in (stale, old_style, alive):
        path.mkdir(parents=True)
        (path / "shard-00000.bin").write_bytes(b"\0" * 100)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a small corpus about nothing much\n" * 200)
    tok = train_tokenizer(read_lines(corpus), tmp_path / "tok", vocab_size=300)
    cached_tokens([str(corpus)], tok, cache_dir=tmp_path / "cache")
    assert not stale.exists() and not old_style.exists() and alive.exists()  # a live process's folder stays
    assert remove_stale_temporaries(tokens) == 0


# --- 2. the token cache ---------------------------------------------------------------------------------------

def test_the_token_cache_is_reused_by_a_second_run_and_can_be_cleared(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    env = {"LLM_CACHE_DIR": str(tmp_path / "cache")}
    for out in ("a", "b"):  # each trains its own tokenizer, records its own paths
        result = run_cli("pretrain", corpus, "--preset", "nano", "--max-steps", "1", "-o", tmp_path / out, env=env)
        assert result.returncode == 0, result.stderr
    assert "tokens found in the cache" in result.stderr
    entries = [json.loads(line) for line in run_cli("cache", "--json", env=env).stdout.splitlines()]
    assert len(entries) == 1 and entries[0]["tokens"] > 10_000 and entries[0]["corpus"] == [str(corpus)]
    report = run_cli("cache", env=env)
    assert report.returncode == 0 and "total" in report.stdout.splitlines()[-1] and str(corpus) in report.stdout
    cleared = run_cli("cache", "--clear", env=env)
    assert cleared.returncode == 0 and cleared.stdout.startswith("freed ")
    assert run_cli("cache", "--json", env=env).stdout == ""

    # one file mode policy: everything a run writes, checkpoint weights included, is 0666 less the umask
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "a").rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_the_cache_key_ignores_the_paths_a_tokenizer_records(tmp_path):
    import sentencepiece as spm

    from llmcli.text.shards import tokenizer_fingerprint

    lines = [f"line {i} of a corpus about cats and dogs" for i in range(500)]
    models = []
    for name in ("one", "two"):  # the old way: SentencePiece writes the model and records its model_prefix
        (tmp_path / name).mkdir()
        spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / name / "tok"),
                                       vocab_size=300, byte_fallback=True, minloglevel=2, num_threads=1)
        models.append((tmp_path / name / "tok.model").read_bytes())
    assert models[0] != models[1]
    assert tokenizer_fingerprint(models[0]) == tokenizer_fingerprint(models[1])
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "three"),
                                   vocab_size=320, byte_fallback=True, minloglevel=2, num_threads=1)
    assert tokenizer_fingerprint((tmp_path / "three.model").read_bytes()) != tokenizer_fingerprint(models[0])
    assert tokenizer_fingerprint(b"not a proto \xff") == b"not a proto \xff"


# --- 3. one line, not a traceback -------------------------------------------------------------------------------

def test_output_directories_that_cannot_be_made(nano_checkpoint, shakespeare_slice, tmp_path):
    records = tmp_path / "records.jsonl"
    records.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi."}) + "\n")
    for args in (["tokenize", "train", shakespeare_slice, "--vocab-size", "400"],
                 ["pretrain", shakespeare_slice, "-t", nano_checkpoint, "--preset", "nano", "--max-steps", "1"],
                 ["finetune", records, "-m", nano_checkpoint, "--max-steps", "1"],
                 ["export", nano_checkpoint]):
        one_line_error(run_cli(*args, "-o", "/proc/foo"), "/proc/foo")


def test_a_read_only_file_system(nano_checkpoint, shakespeare_slice, tmp_path):
    docs_dir = tmp_path / "ro"
    with tmpfs(docs_dir, "1m") as make_read_only:
        (docs_dir / "docs.txt").write_text("a cat sat on the mat\na dog ran in the park\nthe sun is hot\n")
        make_read_only()
        one_line_error(run_cli("tokenize", "train", shakespeare_slice, "--vocab-size", "400", "-o", docs_dir / "t"),
                       "Read-only file system")
        one_line_error(run_cli("pretrain", shakespeare_slice, "-t", nano_checkpoint, "--preset", "nano",
                               "--max-steps", "1", "-o", docs_dir / "run"), "Read-only file system")
        one_line_error(run_cli("embed", docs_dir / "docs.txt", "-m", nano_checkpoint, "-o", docs_dir / "e.npy"),
                       "Read-only file system")
        search = run_cli("search", "a cat", "--docs", docs_dir / "docs.txt", "-m", nano_checkpoint, "-n", "2")
        assert search.returncode == 0 and len(search.stdout.splitlines()) == 2, search.stderr  # just not cached
        assert "not cached" in search.stderr and "Traceback" not in search.stderr


def test_results_to_a_full_device():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    for args, stdin in ((["generate", "hi", "--max-new-tokens", "5"], None), (["tokenize", "encode"], b"hi\n")):
        with open("/dev/full", "w") as full:
            result = subprocess.run([sys.executable, "-m", "llmcli", *args], input=stdin, stdout=full,
                                    stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 1, result.stderr
        assert result.stderr.decode().strip().splitlines()[-1] == \
            "llm: error: cannot write the output: the disk is full"
        assert b"Traceback" not in result.stderr


def test_a_disk_that_fills(nano_checkpoint, shakespeare_slice, tmp_path):
    disk = tmp_path / "disk"
    with tmpfs(disk):
        # metrics.jsonl grows a line a step until the 16 KB are gone (no checkpoint is due before)
        run = run_cli("pretrain", shakespeare_slice, "-t", nano_checkpoint, "--preset", "nano", "--max-steps", "500",
                      "--eval-interval", "1000", "--save-interval", "1000", "-o", disk / "run")
        one_line_error(run, "metrics.jsonl: the disk is full; stopping at step")
        for path in disk.rglob("*"):
            path.unlink() if path.is_file() else None
        (disk / "filler").write_bytes(b"\0" * 12_000)
        one_line_error(run_cli("tokenize", "train", shakespeare_slice, "--vocab-size", "1024", "-o", disk / "tok"),
                       "tokenizer.model: the disk is full")
        assert not [p for p in (disk / "tok").iterdir()]  # no half-written tokenizer left behind


def safetensors_with_header(header: bytes, length: int | None = None) -> bytes:
    return (len(header) if length is None else length).to_bytes(8, "little") + header


def test_malformed_safetensors_headers(nano_checkpoint, shakespeare_slice, tmp_path):
    bad = {"huge": safetensors_with_header(b"{}", 2**62), "list": safetensors_with_header(b"[1, 2]"),
           "string": safetensors_with_header(b'"weights"'),
           "deep": safetensors_with_header(b"[" * 200_000 + b"]" * 200_000),
           "entry": safetensors_with_header(json.dumps({"w": {"dtype": "F32", "shape": "x"}}).encode())}
    for name, blob in bad.items():
        ckpt = tmp_path / name
        shutil.copytree(nano_checkpoint, ckpt, ignore=shutil.ignore_patterns("checkpoints"))
        (ckpt / "model.safetensors").unlink()  # a hard link into the run's checkpoint
        (ckpt / "model.safetensors").write_bytes(blob)
        # generate reads small models with NumPy, eval and info with safetensors: the same reader checks them all
        one_line_error(run_cli("generate", "hi", "-m", ckpt, "--max-new-tokens", "3"), "is corrupt")
    one_line_error(run_cli("info", tmp_path / "deep"), "is corrupt: its header is nested too deeply")
    one_line_error(run_cli("eval", shakespeare_slice, "-m", tmp_path / "huge"),
                   "is corrupt: its header length")


def test_settings_that_cannot_work_are_refused_before_anything_is_written(shakespeare_slice, tmp_path):
    for option, value, fragment in (("--max-steps", "0", "max_steps (--max-steps) must be at least 1"),
                                    ("--lr", "-1", "lr (--lr) must be above 0")):
        out = tmp_path / f"run{option}"
        one_line_error(run_cli("pretrain", shakespeare_slice, "--preset", "nano", option, value, "-o", out), fragment)
        assert not out.exists()


# --- 4. files written safely ----------------------------------------------------------------------------------

def test_search_never_follows_a_planted_symlink_and_rebuilds_a_bad_cache(nano_checkpoint, tmp_path):
    from llmcli.eval.search import cache_path

    docs = tmp_path / "docs.txt"
    docs.write_text("a cat sat on the mat\na dog ran in the park\nthe sun is hot\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's own file\n")
    victim.chmod(0o600)
    cache = cache_path(docs, nano_checkpoint, "mean")
    cache.symlink_to(victim)  # planted by someone who can write the documents folder
    docs.with_name(f".{cache.name}.tmp").symlink_to(victim)  # the old fixed temporary name
    first = run_cli("search", "a cat", "--docs", docs, "-m", nano_checkpoint, "-n", "1")
    assert first.returncode == 0, first.stderr
    assert victim.read_text() == "the user's own file\n" and victim.stat().st_mode & 0o777 == 0o600
    assert cache.is_file() and not cache.is_symlink()

    from safetensors.numpy import save_file

    for wrong in (np.ones((3, 5), np.float32), np.full((3, 64), np.nan, np.float32)):
        save_file({"embeddings": wrong}, str(cache))  # the right number of rows, the wrong vectors
        again = run_cli("search", "a cat", "--docs", docs, "-m", nano_checkpoint, "-n", "1")
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
        assert "does not fit these documents" in again.stderr
    assert "from the cache" in run_cli("search", "a cat", "--docs", docs, "-m", nano_checkpoint, "-n", "1").stderr


def test_pruning_leaves_no_half_checkpoint_and_leftovers_are_cleared(nano_checkpoint, shakespeare_slice, tmp_path):
    run = tmp_path / "run"
    first = run_cli("pretrain", shakespeare_slice, "-t", nano_checkpoint, "--preset", "nano", "--max-steps", "4",
                    "--eval-interval", "100", "--save-interval", "1", "--keep-last", "1", "-o", run)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004"]
    # what a kill in the middle of a prune (old way: a half-deleted step directory) or of a save leaves
    (run / "checkpoints" / ".old-step-0000003").mkdir()
    (run / "checkpoints" / ".old-step-0000003" / "model.safetensors").write_bytes(b"half")
    (run / ".model.safetensors.0123456789abcdef.tmp").write_bytes(b"half")
    resumed = run_cli("pretrain", "--resume", run, "--max-steps", "5")
    assert resumed.returncode == 0, resumed.stderr
    kept = {p.name for p in (run / "checkpoints").iterdir()}
    assert "step-0000005" in kept and kept <= {"step-0000004", "step-0000005"}  # the last, and the best
    assert not list(run.glob(".*")) and not list((run / "checkpoints").glob(".*"))


# --- 5. empty input -------------------------------------------------------------------------------------------

def test_one_rule_for_empty_input(nano_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    # commands that answer each line: no output, a note on stderr, exit 0
    for args in (["generate", "-"], ["embed", "-"], ["tokenize", "encode"]):
        result = run_cli(*args, "-m" if args[0] != "tokenize" else "-t", nano_checkpoint, input="")
        assert result.returncode == 0 and result.stdout == "" and "empty" in result.stderr, (args, result.stderr)
    out = tmp_path / "e.npy"
    result = run_cli("embed", empty, "-m", nano_checkpoint, "-o", out)
    assert result.returncode == 0 and "empty.txt is empty" in result.stderr, result.stderr
    assert np.load(out).shape == (0, 64)
    # commands that compute one result from the whole input: an error
    one_line_error(run_cli("eval", empty, "-m", nano_checkpoint), "no text to score")
    one_line_error(run_cli("search", "a cat", "--docs", empty, "-m", nano_checkpoint), "no documents")
