"""docs/serve.md runs as written: curl and the openai client against `llm serve`, then SIGTERM."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from test_readme import bash_blocks


def run_block(block: str, tmp_path) -> subprocess.CompletedProcess:
    """A block of docs/serve.md under bash, `llm` and `python` as a user has them: programs (so that `kill %1`
    signals the server itself)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, command in (("llm", f'"{sys.executable}" -m llmcli'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("LLM_API_KEY", None)
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)


def test_serving_section_runs(tmp_path):
    result = run_block(bash_blocks(page="docs/serve.md")[0], tmp_path)
    log = (tmp_path / "requests.log").read_text()
    assert result.returncode == 0, result.stderr + log
    lines = result.stdout.splitlines()
    assert json.loads(lines[0])["data"][0]["id"] == "tinystories"
    completion = json.loads(lines[1])
    assert completion["choices"][0]["finish_reason"] == "length" and completion["usage"]["completion_tokens"] == 40
    assert '"delta": {"content": ' in result.stdout and "data: [DONE]" in result.stdout
    assert "CompletionUsage(completion_tokens=" in result.stdout
    assert lines[-1] == "192"  # the embedding's width
    assert log.count(" 200 ") == 6 and "stopped" in log  # a line a request, then a clean stop


def test_log_probabilities_section_runs(tmp_path):
    """The second block: any model name, lm-evaluation-harness's echo request, chat log-probabilities."""
    block = bash_blocks("Clients that send more: any model name, penalties, log-probabilities", "docs/serve.md")[0]
    result = run_block(block, tmp_path)
    assert result.returncode == 0, result.stderr + (tmp_path / "requests.log").read_text()
    lines = result.stdout.splitlines()
    model, rest = lines[0].split(maxsplit=1)
    token, logprob = rest.rsplit(maxsplit=1)
    assert model == "tinystories" and token == "' girl'" and float(logprob) < 0
    assert len(lines) == 6 and all(line.endswith("]") for line in lines[1:])  # 5 tokens, each with 2 alternatives
