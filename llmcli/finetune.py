"""Fine-tuning a pretrained model: instructions (SFT) or text classification, whole or with LoRA adapters.

The data are JSONL records: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} for instructions,
{"text", "label"} for classification. An instruction example is rendered with the chat template into segments
(the prompt's, then each reply's) and tokenized segment by segment, so each token knows whether it is part of a reply:
only reply tokens (and the end-of-text that closes each reply) carry loss, unless train_on_prompt. The examples
become a dataset for train.train_loop, which gives fine-tuning the same steps, validation, checkpoints, resume and
Ctrl-C safety as pretraining.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from llmcli import checkpoint, data
from llmcli.chat import render
from llmcli.config import TrainConfig
from llmcli.errors import LLMError
from llmcli.progress import log
from llmcli.threads import default_threads
from llmcli.tokenizer import TOKENIZER_FILE
from llmcli.train import IGNORE

TASKS = ("sft", "classify")
# The agreed interface with `llm generate --chat` / `llm chat`: each role's turn, and what starts the model's reply.
# A reply ends at <|endoftext|>, so the assistant's turn includes it.
CHAT_TEMPLATE = {
    "system": "<|system|>\n{content}\n",
    "user": "<|user|>\n{content}\n",
    "assistant": "<|assistant|>\n{content}<|endoftext|>",
    "assistant_prefix": "<|assistant|>\n",
}
ROLES = ("system", "user", "assistant")
# fine-tuning starts from trained weights: fewer steps and a gentler start than pretraining
DEFAULTS = dict(max_steps=200, batch_size=16, lr=5e-4, warmup_steps=10, eval_interval=50, eval_batches=4,
                weight_decay=0.0, val_fraction=0.1, precision="fp32")


# --- reading the data -----------------------------------------------------------------------------------------------

def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of a JSONL file; blank lines are skipped; a line that is not a JSON object is named."""
    records = list(data.read_jsonl(path))
    if not records:
        raise LLMError(f"{path} has no records: fine-tuning needs at least one")
    return records


def _string_field(path, number, record, name, needs) -> str:
    if name not in record:
        raise LLMError(f"{path}: line {number}: missing field '{name}' (a record needs {needs})")
    if not isinstance(record[name], (str, int)) or isinstance(record[name], bool):
        raise LLMError(f"{path}: line {number}: field '{name}' must be a string, got {type(record[name]).__name__}")
    return str(record[name])


def read_conversations(path) -> list[list[dict]]:
    """The messages of each instruction record; {prompt, response} is a user turn and an assistant turn."""
    needs = "'prompt' and 'response', or 'messages'"
    conversations = []
    for number, record in read_records(path):
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages:
                raise LLMError(f"{path}: line {number}: 'messages' must be a non-empty list")
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise LLMError(f"{path}: line {number}: each message needs a 'role' ({', '.join(ROLES)}) and a "
                                   f"string 'content', got {json.dumps(m)[:80]}")
            if not any(m["role"] == "assistant" for m in messages):
                raise LLMError(f"{path}: line {number}: no assistant message: nothing to learn")
        else:
            messages = [{"role": "user", "content": _string_field(path, number, record, "prompt", needs)},
                        {"role": "assistant", "content": _string_field(path, number, record, "response", needs)}]
        conversations.append(messages)
    return conversations


def read_classification(path, labels: list[str]) -> list[tuple[str, int]]:
    """(text, label index) of each record; a label that is not one of labels is an error."""
    needs = "'text' and 'label'"
    rows = [(number, _string_field(path, number, r, "text", needs), _string_field(path, number, r, "label", needs))
            for number, r in read_records(path)]
    index = {label: i for i, label in enumerate(labels)}
    for number, _, label in rows:
        if label not in index:
            raise LLMError(f"{path}: line {number}: label {label!r} is not one of the model's ({', '.join(labels)})")
    return [(text, index[label]) for _, text, label in rows]


def discover_labels(path) -> list[str]:
    """The labels of a classification data set, sorted; fewer than two is an error."""
    needs = "'text' and 'label'"
    rows = read_records(path)
    for number, record in rows:
        _string_field(path, number, record, "text", needs)
    labels = sorted({_string_field(path, number, record, "label", needs) for number, record in rows})
    if len(labels) < 2:
        raise LLMError(f"{path}: every record has the label {labels[0]!r}; classification needs at least two")
    return labels


def sft_example(tokenizer, template: dict, messages: list[dict], train_on_prompt: bool) -> tuple[list, list]:
    """Token ids of a conversation (after an end-of-text token) and, for each, whether it carries loss."""
    ids, trained = [tokenizer.end_of_text], [False]
    for m in messages:
        if m["role"] == "assistant":
            before, after = template["assistant"].split("{content}", 1)
            segments = [(before, train_on_prompt), (m["content"] + after, True)]
        else:
            segments = [(template[m["role"]].replace("{content}", m["content"]), train_on_prompt)]
        for text, carries_loss in segments:
            piece = tokenizer.encode(text)
            ids += piece
            trained += [carries_loss] * len(piece)
    return ids, trained


# --- datasets for train.train_loop ------------------------------------------------------------------------------

class ExampleBatches:
    """Batches of whole examples drawn at random (with replacement) from a generator seeded by (seed, split, index),
    so that any batch can be drawn again: resume stays exact."""

    def __init__(self, splits: dict[str, list]):
        self.splits = splits

    def batch(self, split: str, batch_size: int, seed: int, index: int, rows: slice | None = None):
        examples = self.splits[split]
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        picked = rng.integers(0, len(examples), size=batch_size)[rows or slice(None)]
        return self.collate([examples[i] for i in picked])

    def tokens(self, batch_size: int) -> int:
        lengths = [len(example[0]) for example in self.splits["train"]]
        return round(batch_size * sum(lengths) / len(lengths))


class SFTBatches(ExampleBatches):
    """Inputs and next tokens, right-padded; targets of prompt tokens and padding are IGNORE."""

    @staticmethod
    def collate(examples):
        width = max(len(ids) for ids, _ in examples) - 1
        inputs = torch.zeros(len(examples), width, dtype=torch.long)
        targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for row, (ids, trained) in enumerate(examples):
            ids_t = torch.tensor(ids)
            inputs[row, :len(ids) - 1] = ids_t[:-1]
            targets[row, :len(ids) - 1] = torch.where(torch.tensor(trained[1:]), ids_t[1:], IGNORE)
        return inputs, targets


class ClassifyBatches(ExampleBatches):
    """Texts right-padded with classify.PAD, and their label indices."""

    @staticmethod
    def collate(examples):
        from llmcli.classify import pad_batch

        return pad_batch([ids for ids, _ in examples]), torch.tensor([label for _, label in examples])


def _split(examples: list, val_examples: list | None, fraction: float, name: str) -> dict[str, list]:
    if val_examples is not None:
        return {"train": examples, "val": val_examples}
    n_val = int(len(examples) * fraction)
    if n_val == 0:
        log(f"{name}: too few examples to hold some out ({len(examples)}); validating on the training examples "
            "(give --val FILE for a real validation loss)")
        return {"train": examples, "val": examples}
    order = np.random.default_rng(0).permutation(len(examples))  # a fixed split: the same after resume
    return {"train": [examples[i] for i in order[n_val:]], "val": [examples[i] for i in order[:n_val]]}


def make_dataset(run: dict, tokenizer) -> ExampleBatches:
    spec, context = run["finetune"], run["model"]["context"]
    if run["task"] == "classify":
        from llmcli.classify import encode_text

        def load(path):
            return [(encode_text(tokenizer, text, context), label)
                    for text, label in read_classification(path, run["labels"])]
        batches = ClassifyBatches
    else:
        template = run["generation"]["chat_template"]

        def load(path):
            examples, cut = [], 0
            for messages in read_conversations(path):
                ids, trained = sft_example(tokenizer, template, messages, spec["train_on_prompt"])
                if len(ids) > context + 1:  # keep the start: the reply is cut, the prompt kept
                    ids, trained, cut = ids[:context + 1], trained[:context + 1], cut + 1
                if any(trained[1:]):
                    examples.append((ids, trained))
            if cut:
                log(f"{path}: {cut} examples are longer than the context ({context} tokens) and were cut short")
            if not examples:
                raise LLMError(f"{path}: no example has a reply token within the context ({context} tokens)")
            return examples
        batches = SFTBatches
    examples = load(spec["data"])
    val = load(spec["val"]) if spec.get("val") else None
    splits = _split(examples, val, run["train"]["val_fraction"], spec["data"])
    log(f"{len(splits['train'])} training examples, {len(splits['val'])} validation examples")
    return batches(splits)


# --- the model ----------------------------------------------------------------------------------------------------

def prepare_model(base_model, run: dict):
    """The model a run trains, from its base: a classifier head when the task is classification, and LoRA
    adapters (everything else frozen) when the run has an adapter section."""
    from llmcli.classify import from_language_model
    from llmcli.lora import add_lora

    model = base_model
    if run["task"] == "classify":
        model = from_language_model(base_model, len(run["labels"]))
    if "adapter" in run:
        a = run["adapter"]
        model = add_lora(model, a["rank"], a["alpha"], a["dropout"], a["targets"])
    return model


# --- the run ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoRAConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | None = None  # comma-separated; default attn.qkv,attn.proj


def new_run(base: Path, data_path: str, val: str | None, task: str, train_on_prompt: bool, overrides: dict,
            lora: LoRAConfig, base_config: dict, base_model) -> dict:
    if task not in TASKS:
        raise LLMError(f"unknown task {task!r}; choose {' or '.join(TASKS)}")
    for path in (data_path, val):
        if path is not None:
            data.check_text_file(path)
    train = dataclasses.asdict(TrainConfig()) | DEFAULTS | {k: v for k, v in overrides.items() if v is not None}
    generation = {k: v for k, v in (base_config.get("generation") or {}).items() if k != "prompt_template"}
    run = {"task": task, "model": dataclasses.asdict(base_model.config), "train": train,
           "finetune": {"base": str(base.resolve()), "data": str(Path(data_path).resolve()),
                        "val": str(Path(val).resolve()) if val else None, "train_on_prompt": train_on_prompt}}
    if task == "classify":
        run["labels"] = discover_labels(data_path)
    else:
        # the chat template for `llm chat`, and a prompt template so that plain `llm generate "instruction"` works
        generation["chat_template"] = dict(CHAT_TEMPLATE)
        generation["prompt_template"] = render(CHAT_TEMPLATE, [{"role": "user", "content": "{prompt}"}])
    run["generation"] = generation
    if lora.rank:
        from llmcli.lora import fingerprint, parse_targets

        run["adapter"] = {"base": str(base.resolve()), "base_fingerprint": fingerprint(base_model),
                          "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                          "targets": parse_targets(lora.targets)}
    return run


def finetune(data_path: str | None, out_dir: str | Path, base: str | Path | None = None, task: str = "sft",
             val: str | None = None, train_on_prompt: bool = False, overrides: dict | None = None,
             lora: LoRAConfig | None = None, resume: str | Path | None = None) -> dict:
    """Fine-tune `base` on data_path into out_dir (or continue the run in `resume`); returns the loop's summary."""
    from llmcli.checkpoint import default_model_path, load_checkpoint
    from llmcli.train import World, check_settings, checkpoint_dirs, train_loop

    world = World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if resume is not None:
        out_dir = Path(resume)
        if not (out_dir / checkpoint.CONFIG_FILE).is_file():
            raise LLMError(f"cannot resume: {out_dir} is not a fine-tuning run directory")
        run = checkpoint.read_config(out_dir)
        run.pop("format", None), run.pop("summary", None), run.pop("checkpoint", None)
        if "finetune" not in run:
            raise LLMError(f"cannot resume: {out_dir} is not a fine-tuning run (continue pretraining with "
                           "llm pretrain --resume)")
        allowed = {"max_steps", "eval_interval", "save_interval", "keep_last", "micro_batch_size"}
        for key, value in (overrides or {}).items():
            if value is not None and key not in allowed:
                raise LLMError(f"--resume keeps the run's settings; {key} cannot change")
            if value is not None:
                run["train"][key] = value
        base_model, tokenizer, _ = load_checkpoint(run["finetune"]["base"], str(world.device))
        if "adapter" in run:
            from llmcli.lora import fingerprint

            if fingerprint(base_model) != run["adapter"]["base_fingerprint"]:
                raise LLMError(f"cannot resume: the base model at {run['finetune']['base']} has changed since "
                               f"{out_dir} started")
    else:
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or checkpoint_dirs(out_dir)):
            raise LLMError(f"{out_dir} already exists; continue it with --resume {out_dir}, or choose another "
                           "directory")
        base = Path(base) if base is not None else default_model_path()
        base_model, tokenizer, base_config = load_checkpoint(base, str(world.device))
        if base_config.get("task") == "classify" or "adapter" in base_config:
            raise LLMError(f"{base} is a classifier or an adapter; fine-tune a language model (merge an adapter "
                           "first with llm finetune merge)")
        if getattr(tokenizer, "end_of_text", None) is None:
            raise LLMError(f"{base}: its tokenizer has no <|endoftext|> token, which fine-tuning needs")
        if not (Path(tokenizer.files[0]).name == TOKENIZER_FILE):
            raise LLMError(f"{base}: fine-tuning needs a SentencePiece tokenizer.model (this one is "
                           f"{Path(tokenizer.files[0]).name})")
        run = new_run(base, data_path, val, task, train_on_prompt, overrides or {}, lora or LoRAConfig(),
                      base_config, base_model)
    try:
        cfg = TrainConfig(**run["train"])
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad settings: {e}") from None
    micro = check_settings(cfg, world)
    torch.set_num_threads(cfg.threads or default_threads())
    dataset = make_dataset(run, tokenizer)
    if resume is None:
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(out_dir / TOKENIZER_FILE, lambda tmp: tmp.write_bytes(tokenizer.files[0].read_bytes()))
        checkpoint.write_config(out_dir, run)
    torch.manual_seed(cfg.seed)  # the LoRA matrices' initial values
    model = prepare_model(base_model, run).to(world.device).train()
    if run["task"] == "classify":
        what = f"classification into {', '.join(run['labels'])}"
    else:
        what = f"instruction tuning, loss on {'every token' if run['finetune']['train_on_prompt'] else 'replies only'}"
    log(f"fine-tuning {run['finetune']['base']}: {what}" + (f", LoRA rank {run['adapter']['rank']}"
                                                             if "adapter" in run else ""))
    return train_loop(world, run, cfg, out_dir, model, dataset, micro, resume=resume is not None,
                      command="llm finetune")


def merge(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter as one standalone checkpoint (the LoRA updates added into the weights)."""
    from llmcli.checkpoint import load_checkpoint, save_model
    from llmcli.lora import merge_lora

    model, tokenizer, config = load_checkpoint(adapter_dir)
    if "adapter" not in config:
        raise LLMError(f"{adapter_dir} is not a LoRA adapter: it has nothing to merge")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise LLMError(f"{out_dir} already exists; choose a new directory")
    merged = merge_lora(model)
    config = {k: v for k, v in config.items() if k not in ("adapter", "format", "checkpoint")}
    config["merged_from"] = {"adapter": str(Path(adapter_dir).resolve()), "base": config["finetune"]["base"]}
    out_dir.mkdir(parents=True)
    save_model(out_dir, merged)
    checkpoint.atomic_write(out_dir / TOKENIZER_FILE, lambda tmp: tmp.write_bytes(tokenizer.files[0].read_bytes()))
    checkpoint.write_config(out_dir, config)
    return out_dir
