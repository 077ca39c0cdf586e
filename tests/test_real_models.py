"""Models made elsewhere in every command: a Hugging Face folder with a `tokenizer.json` tokenizer whose special
tokens come from the folder's own files (an instruct model's <|im_start|> and <|im_end|>, several end ids), and a
Llama SentencePiece tokenizer without <|endoftext|>. Tiny random models written here; nothing is downloaded."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import SHAKESPEARE, run_cli  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def instruct_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer.json with an instruct model's special tokens (ids 0, 1, 2)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60_000]
    tok.train_from_iterator(text.splitlines(), vocab_size=320, special_tokens=SPECIALS, show_progress=False)
    directory = tmp_path_factory.mktemp("instruct-tok")
    tok.save(str(directory / "tokenizer.json"))
    return directory


def llama_folder(directory, tokenizer_dir, predicts: int | None = None, seed: int = 0):
    """A 2-layer Llama folder on the instruct tokenizer; predicts: a token id every position predicts."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)).eval()
    if predicts is not None:
        with torch.no_grad():  # no attention or MLP output, one embedding for all, a head only `predicts` answers
            model.model.embed_tokens.weight.fill_(1.0)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            model.lm_head.weight.zero_()
            model.lm_head.weight[predicts] = 1.0
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    # the ends a model's own files name: generate() stops at any of generation_config.json's eos ids
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>"}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return directory


def test_special_tokens_come_from_the_folders_files(tmp_path, instruct_tokenizer):
    from llmcli.text.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_folder(tmp_path / "m", instruct_tokenizer))
    # no start token although the vocabulary has <|endoftext|>: the folder names none (as Qwen2.5's and SmolLM2's)
    assert tok.stop_tokens == (0, 2) and tok.start_of_text is None and tok.end_of_text == 0
    assert tok.eos_ids == (2, 0) and {0, 1, 2} <= tok.special_ids
    text = "<|im_start|>user\nHi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == text  # matched whole, and round-trips
    assert tok.decode(ids, skip_special=True) == "user\nHi"


def test_generation_stops_at_any_end_id_and_never_prints_special_tokens(tmp_path, instruct_tokenizer):
    ends = llama_folder(tmp_path / "ends", instruct_tokenizer, predicts=2)  # <|im_end|>, the second end id
    result = run_cli("generate", "Tell me a story", "-m", ends, "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["finish_reason"], record["new_tokens"], record["text"]) == ("stop", 0, "")

    starts = llama_folder(tmp_path / "starts", instruct_tokenizer, predicts=1)  # <|im_start|>: special, no end
    result = run_cli("generate", "Tell me a story", "-m", starts, "--temperature", "0", "--max-new-tokens", "5",
                     "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["finish_reason"], record["new_tokens"], record["text"]) == ("length", 5, "")
    assert "<|im_start|>" not in result.stdout


def test_finetune_lora_and_continued_pretraining_on_a_tokenizer_json_model(tmp_path, instruct_tokenizer,
                                                                            shakespeare_slice):
    base = llama_folder(tmp_path / "base", instruct_tokenizer)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": f"{w} {w}."}) + "\n"
                            for w in ["yes", "no", "maybe", "hello", "stop", "go"] * 4))
    result = run_cli("finetune", data, "-m", base, "--lora-rank", "4", "--max-steps", "4", "--batch-size", "4",
                     "-o", tmp_path / "lora")
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", "Say yes.", "-m", tmp_path / "lora", "--max-new-tokens", "4", "--seed", "1")
    assert result.returncode == 0, result.stderr

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n"
                              for i in range(8) for w in ("good", "bad")))
    result = run_cli("finetune", labels, "-m", base, "--task", "classify", "--max-steps", "3", "--batch-size", "4",
                     "-o", tmp_path / "classifier")
    assert result.returncode == 0, result.stderr
    result = run_cli("classify", "-m", tmp_path / "classifier", "-", input="good 3\nbad 5\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2 and set(result.stdout.split()) <= {"good", "bad"}

    result = run_cli("pretrain", shakespeare_slice, "--init", base, "--preset", "nano", "--max-steps", "3",
                     "--eval-interval", "3", "-o", tmp_path / "continued")
    assert result.returncode == 0, result.stderr
    from llmcli.text.tokenizer import load_tokenizer

    continued = load_tokenizer(tmp_path / "continued")
    assert continued.stop_tokens == (0, 2) and continued.vocab_size == 320  # the same tokenizer, specials and all
    result = run_cli("generate", "ROMEO:", "-m", tmp_path / "continued", "--max-new-tokens", "4", "--seed", "1")
    assert result.returncode == 0, result.stderr


def test_finetune_a_llama_sentencepiece_model_without_end_of_text(tmp_path, shakespeare_slice):
    """A tokenizer.model with <s> and </s> but no <|endoftext|>: examples end with </s>, documents are separated by
    </s> <s>."""
    import sentencepiece as spm

    from llmcli.text.shards import document_separator
    from llmcli.text.tokenizer import Tokenizer

    directory = tmp_path / "llama"
    directory.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare_slice.read_text().splitlines()[:3000]),
                                   model_prefix=str(directory / "tokenizer"), vocab_size=400, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tokenizer = Tokenizer(directory / "tokenizer.model")
    assert (tokenizer.start_of_text, tokenizer.stop_tokens, tokenizer.end_of_text) == (1, (2,), 2)
    assert document_separator(tokenizer) == [2, 1]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).save_pretrained(directory)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ["yes", "no"] * 6))
    result = run_cli("finetune", data, "-m", directory, "--lora-rank", "2", "--max-steps", "2", "--batch-size", "4",
                     "-o", tmp_path / "tuned")
    assert result.returncode == 0, result.stderr
    result = run_cli("pretrain", shakespeare_slice, "--init", directory, "--preset", "nano", "--max-steps", "2",
                     "--eval-interval", "2", "-o", tmp_path / "continued")
    assert result.returncode == 0, result.stderr
