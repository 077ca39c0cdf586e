"""docs/serve.md runs as written: curl and the openai client against `llm serve`, then SIGTERM."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from test_readme import bash_blocks


def test_serving_section_runs(tmp_path):
    (block,) = bash_blocks(page="docs/serve.md")
    # `llm` and `python` as a user has them: programs (so that `kill %1` signals the server itself)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, command in (("llm", f'"{sys.executable}" -m llmcli'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("LLM_API_KEY", None)
    result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env=env)
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
