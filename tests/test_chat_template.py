"""Chat templates: rendered as transformers' apply_chat_template renders them, sandboxed, found where models keep them,
used by llm chat, llm generate --chat and llm finetune (loss on the assistant's turns only)."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import run_cli

from llmcli.errors import LLMError
from llmcli.text.chat_template import ChatTemplate, find_chat_template

# The templates as their models publish them (tokenizer_config.json), Qwen2.5's shortened to its chat and tool parts.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
          " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if "
          "loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
          "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role']"
           " == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and "
           "assistant roles are supported!') }}{% endif %}{% endfor %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# template: (bos_token, eos_token) of its model
TEMPLATES = {"chatml": (CHATML, None, "<|im_end|>"), "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
             "mistral": (MISTRAL, "<s>", "</s>"), "zephyr": (ZEPHYR, "<s>", "</s>"),
             "qwen2.5": (QWEN25, None, "<|im_end|>")}

SYSTEM = {"role": "system", "content": "You are terse."}
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [SYSTEM, {"role": "user", "content": "  Tell me {{ a }} story, {% please %}  \n"}],
    [{"role": "user", "content": "Zürich?"}, {"role": "assistant", "content": "A city <b>in</b> \"Switzerland\"."},
     {"role": "user", "content": "And Bern?"}],
    [SYSTEM, {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": " Blue. "}],
]
TOOL_CALL = [{"role": "user", "content": "Weather in Zürich?"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                 "name": "weather", "arguments": {"city": "Zürich", "units": "<°C>"}}}]},
             {"role": "tool", "content": "12 °C"}, {"role": "assistant", "content": "12 °C & sunny."}]


def hf_tokenizer(template: str, bos: str | None, eos: str):
    """A transformers tokenizer (a tiny word-level vocabulary) carrying the chat template and special tokens."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = {"<unk>": 0, eos: 1} | ({bos: 2} if bos else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(specials, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token=eos, **({"bos_token": bos} if bos else {}))
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_renders_as_transformers_apply_chat_template(name):
    import jinja2

    source, bos, eos = TEMPLATES[name]
    reference, ours = hf_tokenizer(source, bos, eos), ChatTemplate(source, bos_token=bos or "", eos_token=eos)
    conversations = CONVERSATIONS + ([TOOL_CALL] if name == "qwen2.5" else [])
    rendered = 0
    for messages in conversations:
        for add_generation_prompt in (False, True):
            try:
                expected = reference.apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=add_generation_prompt)
            except jinja2.TemplateError as e:  # Mistral's template refuses a system message: so do we, in one line
                with pytest.raises(LLMError, match="roles must alternate"):
                    ours.render(messages, add_generation_prompt)
                assert "roles must alternate" in str(e)
                continue
            assert ours.render(messages, add_generation_prompt) == expected, (name, messages)
            rendered += 1
    assert rendered >= 6
    if name == "qwen2.5":  # the default system message, and tojson as transformers defines it (no HTML escapes)
        text = ours.render(TOOL_CALL)
        assert text.startswith("<|im_start|>system\nYou are Qwen") and '{"city": "Zürich", "units": "<°C>"}' in text


def test_the_generation_tag_strftime_now_and_loop_controls_render_as_in_transformers():
    source = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% generation %}{{ m.content }}"
              "{% endgeneration %}|{% endfor %}{{ strftime_now('%Y') }}{{ messages | tojson(indent=1) }}")
    messages = [{"role": "user", "content": "a<é>"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert ChatTemplate(source).render(messages) == hf_tokenizer(source, None, "</s>").apply_chat_template(
        messages, tokenize=False)


def test_a_template_cannot_reach_python_internals():
    messages = [{"role": "user", "content": "hi"}]
    for source in ("{{ ''.__class__.__mro__ }}", "{{ ''.__class__ }}", "{{ cycler.__init__.__globals__ }}",
                   "{{ messages.__class__.__base__.__subclasses__() }}", "{{ messages.append(1) }}",
                   "{% set ns = namespace(__class__=1) %}"):
        with pytest.raises(LLMError, match="refused") as e:
            ChatTemplate(source).render(messages)
        assert "\n" not in str(e.value)
    assert messages == [{"role": "user", "content": "hi"}]  # and it changed nothing


class FakeTokenizer:
    """The special-token attributes of llmcli/text/tokenizer.py's tokenizers, none of them set."""
    start_of_text = bos_id = chat_template = None
    eos_ids = stop_tokens = ()

    def token(self, i):
        return ""


def test_where_a_model_keeps_its_template(tmp_path):
    messages = [{"role": "user", "content": "x"}]
    tokenizer = FakeTokenizer()
    assert find_chat_template(tmp_path, {}, tokenizer) is None
    # a Hugging Face folder's or a GGUF file's: what the tokenizer read from the model's files
    tokenizer.chat_template = "T{{ messages[0].content }}"
    assert find_chat_template(tmp_path / "model.gguf", {}, tokenizer).render(messages) == "Tx"
    # our checkpoints (and what llm finetune wrote): config.yaml's, before anything else
    ours = {"generation": {"chat_template": "Y{{ messages[0].content }}"}}
    assert find_chat_template(tmp_path, ours, tokenizer).render(messages) == "Yx"
    with pytest.raises(LLMError, match="older form"):
        find_chat_template(tmp_path, {"generation": {"chat_template": {"user": "{content}"}}}, tokenizer)


def test_replies_end_where_the_template_ends_a_turn():
    assert ChatTemplate(CHATML).stops() == ("<|im_end|>", "<|im_start|>user")
    assert ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").stops()[0] == "<|eot_id|>"
    assert ChatTemplate(MISTRAL, "<s>", "</s>").stops() == ("</s>", "[INST]")
    # a template's {{ bos_token }} stays in the prompt (encoded whole, as apply_chat_template does; generation then
    # adds no second one), and leaves the training text, to which fine-tuning adds the start token itself
    llama = ChatTemplate(LLAMA3, "<|begin_of_text|>", "<|eot_id|>", start_added="<|begin_of_text|>")
    turn = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama.prompt([{"role": "user", "content": "hi"}]) == (
        "<|begin_of_text|>" + turn + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama.conversation([{"role": "user", "content": "hi"}]) == turn


def test_help_does_not_import_jinja():
    code = "import sys; from llmcli.cli import app; assert 'jinja2' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- through the CLI ----------------------------------------------------------------------------------------------

def with_template(checkpoint, tmp_path, template: str, name="templated"):
    out = tmp_path / name
    shutil.copytree(checkpoint, out)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config.setdefault("generation", {})["chat_template"] = template
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def test_the_shipped_model_chats():
    args = ("--max-new-tokens", "12", "--temperature", "0")
    chat = run_cli("chat", *args, input="Once upon a time\n")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.strip()) > 5 and "Traceback" not in chat.stderr
    generated = run_cli("generate", "--chat", "Once upon a time", *args)
    assert generated.returncode == 0 and generated.stdout == chat.stdout, generated.stderr


def test_a_hugging_face_folder_chats_with_its_own_template(nano_checkpoint, tmp_path):
    from llmcli.formats import export_model

    folder = export_model(nano_checkpoint, tmp_path / "hf")
    # plain-text markers: this vocabulary has no <|im_start|>, and a template writing it is refused (below)
    plain = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}")
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": plain}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    result = run_cli("generate", "--chat", "hi", "-m", folder, "--max-new-tokens", "3", "--json")
    assert result.returncode == 0 and "no chat template" not in result.stderr, result.stderr
    record = json.loads(result.stdout)
    assert record["templated_prompt"] == "user: hi\nassistant:"


def test_a_template_that_fails_says_so_in_one_line(nano_checkpoint, tmp_path):
    ckpt = with_template(nano_checkpoint, tmp_path, MISTRAL)
    chat = run_cli("chat", "-m", ckpt, "--system", "Be brief.", "--max-new-tokens", "2", input="hi\n")
    assert chat.returncode == 1 and "Traceback" not in chat.stderr
    assert chat.stderr.splitlines()[-1] == (f"llm: error: {ckpt / 'config.yaml'}: generation.chat_template failed: "
                                            "Conversation roles must alternate user/assistant/user/assistant/...")
    assert run_cli("generate", "--chat", "hi", "-m", ckpt, "--max-new-tokens", "2").returncode == 0  # no system: fine

    evil = with_template(nano_checkpoint, tmp_path, "{{ cycler.__init__.__globals__.os.popen('id').read() }}", "evil")
    result = run_cli("generate", "--chat", "hi", "-m", evil)
    assert result.returncode == 1 and "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("llm: error: ") and "refused" in result.stderr
    broken = with_template(nano_checkpoint, tmp_path, "{% for m in messages %}{{ m.content }}", "broken")
    result = run_cli("generate", "--chat", "hi", "-m", broken)
    assert result.returncode == 1 and "is not a valid Jinja template" in result.stderr
    assert "Traceback" not in result.stderr


def test_finetune_puts_loss_on_assistant_turns_only(nano_checkpoint, tmp_path):
    from llmcli.text.tokenizer import Tokenizer
    from llmcli.train.finetune import SFTBatches, sft_example
    from llmcli.train.loop import IGNORE

    tok = Tokenizer(nano_checkpoint)
    template = ChatTemplate.for_tokenizer(CHATML, tok)
    messages = CONVERSATIONS[3]
    ids, trained = sft_example(tok, template, messages, train_on_prompt=False)
    assert ids[0] == tok.start_of_text and tok.decode(ids[1:]) == template.render(messages)
    runs, start = [], None  # the trained tokens' runs, as text
    for i, t in enumerate(trained + [False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(tok.decode(ids[start:i]))
            start = None
    assert runs == ["2<|im_end|>\n", "4<|im_end|>\n"]
    # the text before the first reply is the prompt generation gives the model for it
    assert tok.decode(ids[1:trained.index(True)]) == template.prompt(messages[:2])
    # the batch's targets: the next token where it is an assistant's, IGNORE elsewhere
    _, targets = SFTBatches.collate([(ids, trained)])
    expected = [token if t else IGNORE for token, t in zip(ids[1:], trained[1:])]
    assert targets[0].tolist() == expected

    # through the CLI: the base model's own template is the one trained and kept
    base = with_template(nano_checkpoint, tmp_path, CHATML)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS[2:]))
    result = run_cli("finetune", data, "-m", base, "--max-steps", "2", "--eval-interval", "2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert config["generation"]["chat_template"] == CHATML
    assert config["generation"]["prompt_template"] == "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    # a template that renders a conversation's start differently from the whole: one line naming the record
    last_only = with_template(nano_checkpoint, tmp_path, "{{ messages[-1].content }}", "last-only")
    result = run_cli("finetune", data, "-m", last_only, "--max-steps", "2", "-o", tmp_path / "out2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"llm: error: {data}: line 1: ")
    assert "assistant's turns cannot be found" in result.stderr and not (tmp_path / "out2" / "checkpoints").exists()


def test_a_reply_ends_at_the_templates_end_of_turn_token(tmp_path):
    """A model whose files name <|endoftext|> as its only end, with a ChatML template: its replies end at
    <|im_end|>, a special token (never printed, so no stop string could see it)."""
    pytest.importorskip("transformers")
    from test_real_models import SPECIALS, llama_folder
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(["Say hello to the cat.", "The cat says hello."], vocab_size=280, special_tokens=SPECIALS,
                            show_progress=False)
    tok.save(str(tmp_path / "tokenizer.json"))
    folder = llama_folder(tmp_path / "m", tmp_path, predicts=2)  # every position predicts <|im_end|>
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML}))
    args = ("-m", folder, "--temperature", "0", "--max-new-tokens", "5", "--json")
    plain = json.loads(run_cli("generate", "Say hello", *args).stdout)
    assert (plain["finish_reason"], plain["new_tokens"], plain["text"]) == ("length", 5, "")
    chat = json.loads(run_cli("generate", "--chat", "Say hello", *args).stdout)
    assert (chat["finish_reason"], chat["new_tokens"], chat["text"]) == ("stop", 0, "")
    replies = run_cli("chat", *args[:-1], input="Say hello\nAgain\n")
    assert replies.returncode == 0 and replies.stdout == "\n\n", replies.stderr

    import httpx
    from test_serve import start_server, stop_server

    process, url, log = start_server(tmp_path, "-m", folder)
    try:
        reply = httpx.post(url + "/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["finish_reason"] == "stop" and reply.json()["usage"]["completion_tokens"] == 0
    finally:
        assert stop_server(process) == 0, log.read_text()
