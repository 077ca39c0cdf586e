"""The same tokens as the references, per tokenizer family: for the same files and text, `llm` gives the ids that
transformers gives for a folder (AutoTokenizer, its start token included) and llama.cpp for a GGUF file; a chat of
three turns with a system message gives the ids of transformers' apply_chat_template(tokenize=True).

Each family's tokenizer is made here, tiny (a few hundred tokens trained on a slice of Shakespeare) but shaped as
the real one: Llama 2 / Mistral SentencePiece (<s>, </s>, byte fallback, a space prefix), Llama 3 (its split,
<|begin_of_text|> put first by the post-processor), Qwen2.5 (its split, no start token), SmolLM2 (digits one by one,
no start token) and GPT-2. Nothing is downloaded."""

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import SHAKESPEARE  # noqa: E402
from llamacpp import llama_cpp, llama_cpp_tokens  # noqa: E402

from llmcli.text.chat_template import ChatTemplate  # noqa: E402
from llmcli.text.tokenizer import load_tokenizer  # noqa: E402

HARD = ["Hello world", " one leading space", "   three leading spaces", "\n\n\nnewline runs\n\n", "tabs\tand\r\nCRLF",
        "emoji 🙂🐱 and ünïcödé", "日本語のテキスト", "def f(x):\n    return x ** 2  # code\n", "digits 1234567 3.14159",
        "trailing spaces   ", "a  b   c", "don't you'LL", ""]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1 2 3 🙂"}]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
          "\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + "
          "content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>"
          "assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
           "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}"
           "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + (system if "
           "loop.first else '') + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + "
           "eos_token }}{% endif %}{% endfor %}")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HF_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
HF_QWEN2_SPLIT = HF_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def corpus() -> list[str]:
    return SHAKESPEARE.read_text(encoding="utf-8")[:40_000].splitlines() + HARD * 3


def byte_level(pre_tokenizer, specials: list[str], vocab_size=500, ignore_merges=False):
    """A byte-level BPE tokenizers.Tokenizer trained here with the family's split and special tokens."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return tok


def family_folder(directory, family: str):
    """A folder with the family's tokenizer files (and no weights: tokenizers alone are compared)."""
    from tokenizers import Regex, pre_tokenizers, processors

    directory.mkdir()
    byte_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if family == "gpt2":
        tok = byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"])
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    elif family == "llama3":
        tok = byte_level(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(HF_LLAMA3_SPLIT), "isolated"), byte_split]),
                         LLAMA3_SPECIALS, ignore_merges=True)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])])
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                  "eos_token": "<|eot_id|>", "chat_template": LLAMA3}
    elif family == "qwen2.5":
        tok = byte_level(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(HF_QWEN2_SPLIT), "isolated"), byte_split]),
                         CHATML_SPECIALS)
        tok.normalizer = tokenizers.normalizers.NFC()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>", "chat_template": CHATML}
    elif family == "smollm2":
        tok = byte_level(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)]), CHATML_SPECIALS)
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                  "chat_template": CHATML}
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def sentencepiece_folder(directory, tokenizer_json: bool):
    """Llama 2 / Mistral: tokenizer.model (<unk> <s> </s>, byte fallback, a space prefix), with transformers' own
    tokenizer.json beside it or alone."""
    import sentencepiece as spm

    directory.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_prefix=str(directory / "tokenizer"),
                                   model_type="bpe", vocab_size=600, byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "chat_template": MISTRAL}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if tokenizer_json:
        transformers.AutoTokenizer.from_pretrained(directory).backend_tokenizer.save(str(directory / "tokenizer.json"))
    return directory


FOLDERS = ["gpt2", "llama3", "qwen2.5", "smollm2", "sentencepiece", "sentencepiece+tokenizer.json"]


@pytest.fixture(scope="module", params=FOLDERS)
def folder(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok") / request.param
    if request.param.startswith("sentencepiece"):
        return sentencepiece_folder(directory, request.param.endswith("tokenizer.json"))
    return family_folder(directory, request.param)


def our_ids(tok, text: str) -> list[int]:
    """What generate, chat and serve feed the model: the start token where the model has one (unless the text, a
    chat template's rendering, starts with it), then the text."""
    from llmcli.infer.generate import encode_prompt

    return encode_prompt(tok, text, 1 << 20, False) if text or tok.add_bos else []


def test_hard_strings_get_transformers_ids(folder):
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in HARD:
        assert our_ids(ours, text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text, add_special_tokens=False)["input_ids"])


def test_special_token_text_is_the_special_token(folder):
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for name in ("bos_token", "eos_token"):
        token = getattr(theirs, name)
        if token:
            text = f"before{token} after {token}"
            assert our_ids(ours, text) == theirs(text)["input_ids"], text
            assert theirs.convert_tokens_to_ids(token) in ours.encode(text)


@pytest.mark.parametrize("folder", [f for f in FOLDERS if f != "gpt2"], indirect=True)  # GPT-2 has no template
def test_a_chat_of_three_turns_gets_apply_chat_templates_ids(folder):
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert theirs.chat_template
    template = ChatTemplate.for_tokenizer(ours.chat_template, ours)
    expected = theirs.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert our_ids(ours, template.prompt(CHAT)) == list(expected)


@pytest.mark.skipif(not llama_cpp, reason="llama.cpp's tokens need the xllamacpp wheel (pip install 'llmcli[test]')")
def test_each_family_written_to_gguf_gets_llama_cpps_ids(folder, tmp_path):
    """The family's tokenizer on a tiny model of ours, written to GGUF (its tokenizer.ggml.pre named as llama.cpp's
    converter names it), read back: the ids of llama.cpp itself, start token, special-token text and all."""
    import torch

    from llmcli.config import ModelConfig
    from llmcli.formats import load_model_tokenizer
    from llmcli.formats.gguf import write_gguf
    from llmcli.model.transformer import Transformer

    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=1, n_head=2, n_embd=16,
                                    norm="rmsnorm", positions="rope", mlp="swiglu", bias=False))
    path = write_gguf(model, tokenizer, tmp_path / "tiny.gguf", "f32")
    ours = load_model_tokenizer(path)
    assert (ours.add_bos, ours.start_of_text) == (tokenizer.add_bos, tokenizer.start_of_text)  # kept
    texts = HARD[:-1] + [f"before{tokenizer.token(i)} after" for i in sorted(tokenizer.special_ids)[:3]]
    for text, expected in zip(texts, llama_cpp_tokens(path, texts)):
        assert our_ids(ours, text) == expected, text


def test_each_family_exported_as_a_folder_reads_in_transformers_as_in_llm(folder, tmp_path):
    """The family's tokenizer on a tiny model of ours, written as a Hugging Face folder: AutoTokenizer builds the
    tokenizer llm reads back (tokenizer.json, tokenizer_class), start token and chat template kept."""
    import torch

    from llmcli.config import ModelConfig
    from llmcli.formats.hf import write_hf
    from llmcli.model.transformer import Transformer

    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, context=64, n_layer=1, n_head=2, n_embd=16,
                                    norm="rmsnorm", positions="rope", mlp="swiglu", bias=False))
    out = write_hf(model, tokenizer, tmp_path / "hf")
    ours, theirs = load_tokenizer(out), transformers.AutoTokenizer.from_pretrained(out)
    assert (ours.add_bos, ours.start_of_text, ours.chat_template) == (tokenizer.add_bos, tokenizer.start_of_text,
                                                                      tokenizer.chat_template)
    for text in HARD:
        assert our_ids(ours, text) == theirs(text)["input_ids"] == our_ids(tokenizer, text), text


def one_line_error(*args) -> str:
    from conftest import run_cli

    result = run_cli(*args)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_bad_tokenizers_are_refused_in_one_line(tmp_path):
    """A chat template that writes a token the vocabulary lacks, a tokenizer.json larger than the embedding, a GGUF
    pre-tokenizer llmcli does not implement: one line each, exit non-zero, never another split silently."""
    import torch

    from llmcli.formats import export_model

    folder = family_folder(tmp_path / "gpt2", "gpt2")
    size = load_tokenizer(folder).vocab_size
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=size, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": CHATML}))
    assert "writes <|im_start|>, which is not a token" in one_line_error("generate", "--chat", "hi", "-m", folder)

    small = family_folder(tmp_path / "small", "gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=size - 10, n_embd=16, n_layer=1, n_head=2,
                                                         n_positions=64)).save_pretrained(small)
    assert f"the tokenizer has {size} tokens but the model's embedding only {size - 10}" in one_line_error(
        "generate", "hi", "-m", small)

    smol = family_folder(tmp_path / "smol", "smollm2")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=load_tokenizer(smol).vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64)).save_pretrained(smol)
    path = export_model(smol, tmp_path / "smol.gguf", "gguf", "f32")
    data = path.read_bytes()
    assert data.count(b"smollm") == 1  # tokenizer.ggml.pre, the same length as tekken's name
    (tmp_path / "tekken.gguf").write_bytes(data.replace(b"smollm", b"tekken"))
    assert "tokenizer.ggml.pre 'tekken' is a pre-tokenizer llmcli does not implement" in one_line_error(
        "generate", "hi", "-m", tmp_path / "tekken.gguf")
