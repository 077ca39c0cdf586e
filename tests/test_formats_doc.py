"""The commands of docs/formats.md's section on tokens run: a checkpoint, its GGUF export and its Hugging Face export
get the same prompt tokens (the start token kept by both exports) and the same greedy text."""

import json
import re
import shutil

from conftest import ROOT
from test_readme import run_bash

DOC = (ROOT / "docs" / "formats.md").read_text(encoding="utf-8")


def test_tokens_section_commands_run(tmp_path, nano_checkpoint):
    shutil.copytree(nano_checkpoint, tmp_path / "shakespeare-nano")
    section = DOC.split("## Tokens: start and end tokens, special-token text, exports\n", 1)[1].split("\n## ", 1)[0]
    result = run_bash("\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 3
    assert len({(r["prompt_tokens"], r["text"]) for r in records}) == 1
    assert records[0]["prompt_tokens"] > 1 and records[0]["text"]
