"""Fine-tuning a pretrained model: instructions (SFT) or text classification, whole or with LoRA adapters.

The data are JSONL records: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} for instructions,
{"text", "label"} for classification. An instruction example is rendered with the chat template (the base model's own,
else ours, CHAT_TEMPLATE) and cut into segments, the text around the assistant's turns and each turn itself
(llmcli/text/chat_template.py), then tokenized segment by segment, so each token knows whether it is part of a reply:
only reply tokens (and what ends each reply: the end token) carry loss, unless train_on_prompt. The examples
become a dataset for the Trainer (llmcli/train/loop.py), which gives fine-tuning the same steps, validation,
checkpoints, resume, run-directory lock and Ctrl-C safety as pretraining.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from llmcli.config import TrainConfig
from llmcli.errors import LLMError
from llmcli.files import make_output_dir
from llmcli.formats import ours as checkpoint
from llmcli.formats.adapter import prepare_model
from llmcli.progress import log
from llmcli.text import data
from llmcli.text.chat_template import CONFIG_KEY, ChatTemplate, find_chat_template
from llmcli.runtime import default_threads
from llmcli.train.checkpoints import checkpoint_dirs
from llmcli.train.loop import IGNORE, Trainer, World, micro_batch_size
from llmcli.train.run import Run, locked, train_config

TASKS = ("sft", "classify")
# Our chat template (Jinja, as any model's), for a base model that has none: "<|user|>\n" and the message on a line,
# the same for "<|system|>"; the reply after "<|assistant|>\n" ends with the end token (ours: <|endoftext|>), which
# the reply is trained to produce. One line: it stays one line in config.yaml.
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'assistant' %}"
                 "{{ '<|assistant|>\\n' + message['content'] + eos_token }}"
                 "{% else %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
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


def read_conversations(path) -> list[tuple[int, list[dict]]]:
    """(line number, messages) of each instruction record; {prompt, response} is a user turn and an assistant turn."""
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
        conversations.append((number, messages))
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


def sft_example(tokenizer, template: ChatTemplate, messages: list[dict], train_on_prompt: bool
                ) -> tuple[list, list]:
    """Token ids of a conversation (after the start token, as generation puts it before a prompt) and, for each,
    whether it carries loss: the assistant's turns only, unless train_on_prompt. Each segment is tokenized alone, so
    the text before a reply gives the tokens generation will see for that prompt."""
    if train_on_prompt:
        segments = [(template.conversation(messages), True)]
    else:
        segments = template.segments(messages)
    ids = [tokenizer.start_of_text] if tokenizer.start_of_text is not None else []
    trained = [False] * len(ids)
    for text, carries_loss in segments:
        piece = tokenizer.encode(text)
        ids += piece
        trained += [carries_loss] * len(piece)
    return ids, trained


# --- datasets for the Trainer ------------------------------------------------------------------------------------

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
        from llmcli.model.heads import pad_batch

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


def make_dataset(run: Run, tokenizer) -> ExampleBatches:
    spec, context = run.extra["finetune"], run.model.context
    if run.extra["task"] == "classify":
        from llmcli.model.heads import encode_text

        def load(path):
            return [(encode_text(tokenizer, text, context), label)
                    for text, label in read_classification(path, run.extra["labels"])]
        batches = ClassifyBatches
    else:
        template = ChatTemplate.for_tokenizer(run.generation["chat_template"], tokenizer,
                                              f"the run's chat template ({CONFIG_KEY})")

        def load(path):
            examples, cut = [], 0
            for number, messages in read_conversations(path):
                try:
                    ids, trained = sft_example(tokenizer, template, messages, spec["train_on_prompt"])
                except LLMError as e:
                    raise LLMError(f"{path}: line {number}: {e}") from None
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
    splits = _split(examples, val, run.train.val_fraction, spec["data"])
    log(f"{len(splits['train'])} training examples, {len(splits['val'])} validation examples")
    return batches(splits)


# --- the run ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LoRAConfig:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | None = None  # comma-separated; default attn.qkv,attn.proj


def new_run(base: Path, data_path: str, val: str | None, task: str, train_on_prompt: bool, overrides: dict,
            lora: LoRAConfig, base_config: dict, base_model, tokenizer) -> Run:
    """The settings of a new run (task and data files checked by finetune() already); overrides: train settings by
    name, "lr" or "train.lr"."""
    train = dataclasses.asdict(TrainConfig()) | DEFAULTS
    for key, value in overrides.items():
        if key.startswith("model."):
            raise LLMError(f"fine-tuning keeps the base model's shape; {key} cannot be set")
        if value is not None:
            train[key.removeprefix("train.")] = value
    generation = {k: v for k, v in (base_config.get("generation") or {}).items() if k != "prompt_template"}
    extra = {"task": task, "finetune": {"base": str(base.resolve()), "data": str(Path(data_path).resolve()),
                                        "val": str(Path(val).resolve()) if val else None,
                                        "train_on_prompt": train_on_prompt}}
    if task == "classify":
        extra["labels"] = discover_labels(data_path)
    else:
        # the base model's chat template (ours if it has none) is the one trained, and kept for `llm chat`; a prompt
        # template built from it makes plain `llm generate "instruction"` work
        template = (find_chat_template(base, base_config, tokenizer)
                    or ChatTemplate.for_tokenizer(CHAT_TEMPLATE, tokenizer, "llm finetune's chat template"))
        generation["chat_template"] = template.source
        generation["prompt_template"] = template.prompt([{"role": "user", "content": "{prompt}"}])
    if lora.rank:
        from llmcli.model.lora import fingerprint, parse_targets

        extra["adapter"] = {"base": str(base.resolve()), "base_fingerprint": fingerprint(base_model),
                            "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                            "targets": parse_targets(lora.targets)}
    return Run(model=base_model.config, train=train_config(train), generation=generation, extra=extra)


def finetune(data_path: str | None, out_dir: str | Path, base: str | Path | None = None, task: str = "sft",
             val: str | None = None, train_on_prompt: bool = False, overrides: dict | None = None,
             lora: LoRAConfig | None = None, resume: str | Path | None = None) -> dict:
    """Fine-tune `base` on data_path into out_dir (or continue the run in `resume`); returns the Trainer's summary.
    overrides: train settings by name ({"lr": 1e-4, "train.warmup_steps": 5}); None values are unset."""
    world = World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if resume is not None:
        out_dir = Path(resume)
        run, base_model, tokenizer = _resumed_run(out_dir, overrides, world)
    else:
        out_dir = Path(out_dir)
        run, base_model, tokenizer = _started_run(out_dir, data_path, base, task, val, train_on_prompt,
                                                  overrides or {}, lora or LoRAConfig(), world)
    micro_batch_size(run.train, world)
    torch.set_num_threads(run.train.threads or default_threads())
    dataset = make_dataset(run, tokenizer)
    if resume is None:
        make_output_dir(out_dir)
    with locked(out_dir):
        if resume is None:
            tokenizer.save(out_dir)
            run.save(out_dir)
        torch.manual_seed(run.train.seed)  # the LoRA matrices' initial values
        model = prepare_model(base_model, run.to_dict()).to(world.device).train()
        log(f"fine-tuning {run.extra['finetune']['base']}: {_describe(run)}")
        trainer = Trainer(world, run, out_dir, model, dataset, command="llm finetune")
        return trainer.setup(resume=resume is not None).fit()


def _describe(run: Run) -> str:
    if run.extra["task"] == "classify":
        what = f"classification into {', '.join(run.extra['labels'])}"
    else:
        on = "every token" if run.extra["finetune"]["train_on_prompt"] else "replies only"
        what = f"instruction tuning, loss on {on}"
    return what + (f", LoRA rank {run.extra['adapter']['rank']}" if "adapter" in run.extra else "")


def _resumed_run(out_dir: Path, overrides: dict | None, world: World):
    """(the run in out_dir with the settings a resume may change changed, its base model, tokenizer)."""
    from llmcli.formats import load_model

    if not (out_dir / checkpoint.CONFIG_FILE).is_file():
        raise LLMError(f"cannot resume: {out_dir} is not a fine-tuning run directory")
    run = Run.resume(out_dir, overrides)
    if "finetune" not in run.extra:
        raise LLMError(f"cannot resume: {out_dir} is not a fine-tuning run (continue pretraining with "
                       "llm pretrain --resume)")
    base_model, tokenizer, _ = load_model(run.extra["finetune"]["base"], str(world.device))
    if "adapter" in run.extra:
        from llmcli.model.lora import fingerprint

        if fingerprint(base_model) != run.extra["adapter"]["base_fingerprint"]:
            raise LLMError(f"cannot resume: the base model at {run.extra['finetune']['base']} has changed since "
                           f"{out_dir} started")
    return run, base_model, tokenizer


def _started_run(out_dir: Path, data_path, base, task, val, train_on_prompt, overrides, lora, world: World):
    """(a new run's settings, its base model, tokenizer), the data files and the base model checked."""
    from llmcli.formats import load_model, resolve_model

    if out_dir.exists() and (not out_dir.is_dir() or checkpoint_dirs(out_dir)):
        raise LLMError(f"{out_dir} already exists; continue it with --resume {out_dir}, or choose another "
                       "directory")
    if task not in TASKS:  # these before the base model is loaded: a typo is said at once
        raise LLMError(f"unknown task {task!r}; choose {' or '.join(TASKS)}")
    for path in (data_path, val):
        if path == "-":
            raise LLMError("llm finetune reads its records from a file, not stdin (a resumed run reads them "
                           "again): save them to a file first")
        if path is not None:
            data.check_text_file(path)
    base = resolve_model(base)  # a Hub id becomes its local files, which the run records
    base_model, tokenizer, base_config = load_model(base, str(world.device))
    if base_config.get("task") == "classify" or "adapter" in base_config:
        raise LLMError(f"{base} is a classifier or an adapter; fine-tune a language model (merge an adapter "
                       "first with llm finetune merge)")
    if tokenizer.end_of_text is None:
        raise LLMError(f"{base}: its tokenizer has neither <|endoftext|> nor an end token, which fine-tuning "
                       "needs to mark where an example ends")
    run = new_run(base, data_path, val, task, train_on_prompt, overrides, lora, base_config, base_model, tokenizer)
    return run, base_model, tokenizer


def merge(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter as one standalone checkpoint (the LoRA updates added into the weights)."""
    from llmcli.formats import load_model
    from llmcli.formats.ours import save_model
    from llmcli.model.lora import merge_lora

    model, tokenizer, config = load_model(adapter_dir)
    if "adapter" not in config:
        raise LLMError(f"{adapter_dir} is not a LoRA adapter: it has nothing to merge")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise LLMError(f"{out_dir} already exists; choose a new directory")
    merged = merge_lora(model)
    config = {k: v for k, v in config.items() if k not in ("adapter", "format", "checkpoint")}
    config["merged_from"] = {"adapter": str(Path(adapter_dir).resolve()), "base": config["finetune"]["base"]}
    make_output_dir(out_dir, exist_ok=False)
    save_model(out_dir, merged)
    tokenizer.save(out_dir)
    checkpoint.write_config(out_dir, config)
    return out_dir
