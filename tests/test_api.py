"""The Python API (llmcli/api.py): the same text as the CLI, batches, streams, chat, bits per byte, errors; and the
```python blocks of docs/api.md, run as they are."""

import re
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli

import llmcli
from llmcli.errors import LLMError


@pytest.fixture(scope="module")
def model():
    return llmcli.load()


def test_the_docs_python_blocks_run(model, capsys, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 5
    monkeypatch.setattr(llmcli, "load", lambda *args, **kwargs: model)  # (loaded once for the module)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert namespace["text"] in printed and namespace["reply"] in printed and len(printed.splitlines()) >= 4


def test_generate_gives_the_text_of_llm_generate(model):
    """The CLI decodes the shipped model on NumPy, the API on torch: the same settings and decoder, the same text."""
    for options, args in (({"temperature": 0}, ("--temperature", "0")), ({"seed": 3}, ("--seed", "3"))):
        text = model.generate("Once upon a time", max_new_tokens=24, **options)
        cli = run_cli("generate", "Once upon a time", "--max-new-tokens", "24", *args)
        assert cli.returncode == 0, cli.stderr
        assert isinstance(text, str) and text and cli.stdout == text + "\n"


def test_a_batch_gives_each_prompts_text_and_samples_differ(model):
    prompts = ["Once upon a time", "The little dog", "Once upon a time"]
    texts = model.generate(prompts, max_new_tokens=16, seed=5)
    assert texts == [model.generate(p, max_new_tokens=16, seed=5) for p in prompts]
    samples = model.generate(["The cat"], max_new_tokens=16, seed=5, num_samples=3)
    assert len(samples) == 1 and len(samples[0]) == 3 and len(set(samples[0])) > 1


def test_stream_yields_the_generated_text_in_pieces(model):
    pieces = list(model.stream("Once upon a time", max_new_tokens=20, seed=1))
    assert len(pieces) > 1 and "".join(pieces) == model.generate("Once upon a time", max_new_tokens=20, seed=1)
    stopped = model.generate("Once upon a time", max_new_tokens=40, temperature=0, stop=" a ")
    assert " a " not in stopped and "".join(model.stream("Once upon a time", max_new_tokens=40, temperature=0,
                                                           stop=" a ")) == stopped
    first = next(model.stream("Once upon a time", max_new_tokens=20, seed=1))  # left early: the engine is free again
    assert first == pieces[0] and model.generate("The dog", max_new_tokens=5, seed=1)


def test_chat_replies_to_a_conversation(model):
    messages = [{"role": "system", "content": "Tell stories."}, {"role": "user", "content": "A story about a cat."}]
    reply = model.chat(messages, max_new_tokens=30, seed=2)
    assert isinstance(reply, str) and reply == model.chat(messages, max_new_tokens=30, seed=2)
    for bad in ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}]):
        with pytest.raises(LLMError, match="messages"):
            model.chat(bad)


def test_bits_per_byte_is_llm_evals_score_of_the_text(model, tmp_path):
    from llmcli.eval.evaluate import evaluate_file

    text = "Once upon a time there was a little cat. She liked to play in the sun with her friend, a big dog."
    (tmp_path / "story.txt").write_text(text + "\n")
    expected = evaluate_file(model.net, model.tokenizer, str(tmp_path / "story.txt"))["bits_per_byte"]
    assert model.bits_per_byte(text) == pytest.approx(expected, rel=1e-9) and 0 < expected < 8
    assert model.bits_per_byte("Zebras quantum xylophone the the the.") > model.bits_per_byte(text)


def test_bad_input_raises_the_clis_error(model, tmp_path):
    with pytest.raises(LLMError, match="does not exist"):
        llmcli.load(tmp_path / "nothing")
    with pytest.raises(LLMError, match="--top-p"):
        model.generate("Once", top_p=2.0)
    with pytest.raises(LLMError, match="context"):
        model.generate("Once upon a time " * 200)
    assert model.generate("Once upon a time " * 200, max_new_tokens=3, truncate=True, temperature=0)
    with pytest.raises(TypeError):
        model.generate("Once", no_such_option=1)


def test_import_llmcli_loads_the_api_only_when_used():
    code = "import sys, llmcli; print('llmcli.api' in sys.modules, 'torch' in sys.modules, callable(llmcli.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.split() == ["False", "False", "True"]
