"""The commands of docs/formats.md's GGUF section run, on a checkpoint like the walkthrough's; the file they write reads
back with the weights and tokens of the checkpoint."""

import shutil

import pytest
import torch
from test_readme import bash_blocks, run_bash

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")


def test_gguf_section_commands_run(tmp_path, nano_checkpoint):
    from llmcli.formats import load_model

    shutil.copytree(nano_checkpoint, tmp_path / "shakespeare-nano")
    result = run_bash("\n".join(bash_blocks("GGUF files: llama.cpp's and ollama's models, in and out", "docs/formats.md")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    path = tmp_path / "shakespeare-nano.q8_0.gguf"
    assert lines[0] == path.name and path.is_file()
    assert any(line.startswith("architecture") and "llama (GGUF)" in line for line in lines)
    assert any(line.startswith("dtype") and "Q8_0" in line for line in lines)
    printed = [line for line in lines if line.strip()]  # a sample may end with blank lines
    assert not printed[-1].startswith("size on disk")  # the generated text, after info's lines
    ours, tok, _ = load_model(tmp_path / "shakespeare-nano")
    exported, exported_tok, _ = load_model(path)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert exported_tok.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        before, after = ours(ids), exported(ids)
    assert (after - before).abs().max() < 0.05 * before.abs().max()  # Q8_0: 8 bits a weight
