"""The commands of docs/models.md and docs/data.md run, as tests/test_readme.py runs the README's."""

import json
import re

from conftest import ROOT
from test_readme import run_bash


def doc_blocks(name: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / name).read_text(encoding="utf-8"), flags=re.S))


def test_models_doc_commands_run(tmp_path):
    hf = f"export HF_HUB_CACHE={tmp_path / 'hub'} HF_HOME={tmp_path / 'home'}\n"  # an empty cache, not the user's
    result = run_bash(hf + doc_blocks("models.md"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "the shipped model" in lines[0] and lines[0].count("\t") == 2
    shipped = json.loads(lines[1])
    assert shipped["path"].endswith("tinystories") and shipped["size_bytes"] > 1_000_000
    assert any(line.startswith("HuggingFaceTB/SmolLM2-135M-Instruct\t$LLM_MODEL") for line in lines)
    assert lines[-1] == "exit 1"
    errors = [line for line in result.stderr.splitlines() if line.startswith("llm: error:")]
    assert errors == ["llm: error: some-org/not-downloaded-here is not in the Hugging Face cache "
                      f"({tmp_path / 'hub'}), and HF_HUB_OFFLINE=1 forbids downloading it"]


def test_data_doc_commands_run(tmp_path):
    (tmp_path / "data").symlink_to(ROOT / "data")  # run from the clone's root, as the doc says
    result = run_bash(doc_blocks("data.md"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = (ROOT / "data" / "README.md").read_text(encoding="utf-8")
    digest = result.stdout.split()[0]
    assert f"`{digest}`" in table  # the committed file is the one data/README.md describes
    assert (tmp_path / "stories-tok" / "tokenizer.model").is_file()
    assert (tmp_path / "parquet-nano" / "model.safetensors").is_file()
    assert (tmp_path / "mixed-tok" / "tokenizer.model").is_file()
    assert result.stdout.splitlines()[-1] == "exit 1" and not (tmp_path / "never").exists()
    assert "blob.bin is a binary file, not a corpus" in result.stderr
