"""The commands of docs/eval.md run, on a checkpoint like the walkthrough's."""

import json
import shutil

import numpy as np
from conftest import ROOT
from test_readme import bash_blocks, run_bash, workdir


def test_evaluation_section_commands_run(tmp_path, nano_checkpoint):
    work = workdir(tmp_path)
    (work / "examples").symlink_to(ROOT / "examples")  # the commands run from the repository root
    shutil.copytree(nano_checkpoint, work / "shakespeare-nano")
    result = run_bash("\n".join(bash_blocks(page="docs/eval.md")), cwd=work)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "bits per byte" in out and "shakespeare-nano" in out and "stride 32" in out
    tasks = [json.loads(line) for line in out.splitlines() if line.startswith('{"model"')]
    assert [t["chance"] for t in tasks] == [0.25, 0.5] and all(t["examples"] == 200 for t in tasks)
    assert any(line.startswith("[") and len(json.loads(line)) == 64 for line in out.splitlines())
    assert np.load(work / "stories.npy").shape[1] == 64
    hits = [line.split("\t") for line in out.splitlines() if line.count("\t") == 3]
    assert [h[0] for h in hits] == ["1", "2", "3"]
    assert list(work.glob(".stories.txt.*.embeddings.safetensors"))
