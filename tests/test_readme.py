"""The README's commands are run here, so the README cannot rot; `bash_blocks` reads the docs pages' too (their tests:
tests/test_docs.py lists them)."""

import json
import os
import re
import subprocess

import yaml
import zygote
from conftest import ROOT, SHAKESPEARE, TINYSTORIES_TRAIN, TINYSTORIES_VALID

README = (ROOT / "README.md").read_text(encoding="utf-8")


def bash_blocks(section: str | None = None, page: str = "README.md") -> list[str]:
    """The ```bash blocks of a page (README.md, or docs/NAME.md), of its `## section` only when one is named."""
    body = (ROOT / page).read_text(encoding="utf-8")
    if section is not None:
        body = body.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def run_bash(script: str, cwd) -> subprocess.CompletedProcess:
    # `llm` is this checkout's package under the running Python, whatever is on PATH: `python -m llmcli`, or the same
    # run forked from a process that has already imported torch (tests/zygote.py)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    llm = " ".join(f'"{part}"' for part in zygote.llm(env))
    prelude = f'set -euo pipefail\nllm() {{ {llm} "$@"; }}\n'
    return subprocess.run(["bash", "-c", prelude + script], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=env)


def _stories(text: str, chars: int) -> str:
    """The first whole stories of a TinyStories file, about `chars` characters of them."""
    end = text.index("<|endoftext|>\n", chars) + len("<|endoftext|>\n")
    return text[:end]


def workdir(tmp_path):
    """An empty directory to run a README section in, as if it were the clone's root: a data/ holding the start of
    each of the repository's corpora (the commands run as written; the claims they check do not need whole corpora)."""
    work = tmp_path / "work"
    data = work / "data"
    (data / "tinystories").mkdir(parents=True)
    (data / "tinyshakespeare.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    for real, chars in ((TINYSTORIES_TRAIN, 100_000), (TINYSTORIES_VALID, 40_000)):
        (data / "tinystories" / real.name).write_text(_stories(real.read_text(encoding="utf-8"), chars),
                                                      encoding="utf-8")
    return work


def test_quick_start_has_two_lines_and_ci_runs_the_second():
    (block,) = bash_blocks("Quick start")
    install_and_run, install_and_test = block.strip().splitlines()
    assert install_and_run.startswith("pip install ") and ' && llm generate "' in install_and_run
    assert install_and_test.startswith("pip install ") and "[test]" in install_and_test
    assert install_and_test in (ROOT / ".ci" / "run").read_text()


def test_quick_start_generates_a_story(tmp_path):
    (block,) = bash_blocks("Quick start")
    command = block.strip().splitlines()[0].split(" && ", 1)[1]  # the part after the install
    result = run_bash(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) >= 20  # words of a story


def test_walkthrough_commands_run(tmp_path):
    work = workdir(tmp_path)
    result = run_bash("\n".join(bash_blocks("Walkthrough: from a text file to a model")), cwd=work)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    lines = out.splitlines()
    assert "To be, or not to be: that is the question.\n" in out  # encode | decode round trip
    pieces = next(i for i, line in enumerate(lines) if '"pieces"' in line)
    assert lines[pieces + 1] == "shakespeare-nano"  # pretrain prints the checkpoint, and nothing else
    assert (work / "shakespeare-nano" / "model.safetensors").is_file()
    scores = json.loads(lines[-1])
    assert scores["file"] == "data/tinyshakespeare.txt" and scores["model"] == "shakespeare-nano"
    assert "bits/byte" in out and f"{scores['bits_per_byte']:.4f}" in out  # the table says what --json says


def test_long_run_commands_run(tmp_path):
    work = workdir(tmp_path)
    result = run_bash("\n".join(bash_blocks(page="docs/training.md")), cwd=work)
    assert result.returncode == 0, result.stderr
    assert "resuming long-run from step 20" in result.stderr
    # the stories run: micro-batches, bf16-mixed and wsd were taken, said and stored
    assert "16 sequences, 2 micro-batches of 8, bf16-mixed" in result.stderr
    stories = yaml.safe_load((work / "stories" / "config.yaml").read_text())["train"]
    assert (stories["micro_batch_size"], stories["precision"], stories["schedule"]) == (8, "bf16-mixed", "wsd")
    tuned = yaml.safe_load((work / "tuned" / "config.yaml").read_text())["train"]
    assert (tuned["warmup_steps"], tuned["beta2"]) == (2, 0.99)  # --set
    assert (work / "stories" / "tokenizer.model").read_bytes() == (work / "long-run" / "tokenizer.model").read_bytes()
    assert (work / "long-run" / "checkpoints" / "step-0000030").is_dir()
    assert "on 2 processes" in result.stderr
    assert (work / "two-processes" / "model.safetensors").is_file()
    assert "on 2 processes (fsdp)" in result.stderr and (work / "sharded" / "model.safetensors").is_file()
    assert (work / "loss.png").read_bytes()[:4] == b"\x89PNG"
