"""The commands of docs/finetune.md run, on a checkpoint like the walkthrough's."""

import json
import shutil

from test_readme import bash_blocks, run_bash


def test_fine_tuning_section_commands_run(tmp_path, nano_checkpoint):
    shutil.copytree(nano_checkpoint, tmp_path / "shakespeare-nano")
    result = run_bash("\n".join(bash_blocks(page="docs/finetune.md")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "assistant" in lines and "Blue." in lines
    assert any(line.startswith("passages.jsonl: 4 examples, accuracy") for line in lines)
    labelled = json.loads(next(line for line in lines if line.startswith('{"label"')))
    assert labelled["label"] in ("shakespeare", "tinystories")
    assert "merged" in lines and (tmp_path / "merged" / "model.safetensors").is_file()
    sizes = {line.split()[-1]: int(line.split()[4]) for line in lines if line.endswith("model.safetensors")}
    assert sizes["adapter/model.safetensors"] < 0.2 * sizes["merged/model.safetensors"]
