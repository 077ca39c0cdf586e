"""The commands of docs/formats.md's Hugging Face section run, on a checkpoint like the walkthrough's."""

import json
import shutil

from test_readme import bash_blocks, run_bash


def test_hugging_face_section_commands_run(tmp_path, nano_checkpoint):
    shutil.copytree(nano_checkpoint, tmp_path / "shakespeare-nano")
    result = run_bash("\n".join(bash_blocks("Hugging Face models: open, export, inspect", "docs/formats.md")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "shakespeare-hf" and (tmp_path / "shakespeare-hf" / "config.json").is_file()
    assert any(line.startswith("architecture") and "LlamaForCausalLM" in line for line in lines)
    at = next(i for i, line in enumerate(lines) if line.startswith("{"))
    about = json.loads(lines[at])
    assert about["architecture"] == "llmcli Transformer" and about["context"] == 64
    assert len(" ".join(lines[at + 1:]).split()) >= 2  # generated text, after the JSON line
