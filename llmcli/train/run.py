"""A training run: its settings and records, typed, as its directory's config.yaml holds them; and the lock that
keeps a second run from writing into a directory a run is writing.

config.yaml holds the model's shape (`model`), how it trains (`train`), the sampling defaults stored for
`llm generate` (`generation`), and what the run records: the tokenizer and the tokenized corpus of a pretraining
run, the task, data and base model of a fine-tuning run (kept in `extra`, written back as they were read).
"""

import dataclasses
import fcntl
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmcli.config import RESUMABLE, ModelConfig, TrainConfig, resolve_run_config
from llmcli.errors import LLMError
from llmcli.formats import ours as checkpoint


@dataclass
class Run:
    model: ModelConfig
    train: TrainConfig
    generation: dict = field(default_factory=dict)
    preset: str | None = None
    tokenizer: dict | None = None  # {"file", "vocab_size"} of the run's tokenizer
    data: dict | None = None  # the corpus, its hash and token counts, where its token shards are
    extra: dict = field(default_factory=dict)  # task, finetune, labels, adapter, init: as the kind of run has them
    summary: dict | None = None  # of the finished run

    @classmethod
    def new(cls, preset: str | None, config_file, settings: dict | None) -> "Run":
        """A new run's settings: preset < config file < settings ({"train.lr": 0.01} or {"lr": 0.01}), checked."""
        resolved = resolve_run_config(preset, config_file, settings or {})
        return cls(model=model_config(resolved["model"]), train=train_config(resolved["train"]),
                   generation=resolved["generation"], preset=resolved["preset"])

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        """The run recorded in run_dir/config.yaml (LLMError if it is not one or its settings are bad)."""
        config = checkpoint.read_config(Path(run_dir))
        for key in ("format", "summary", "checkpoint"):
            config.pop(key, None)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "summary"}
        if not isinstance(config.get("train", {}), dict):
            raise LLMError(f"{run_dir}: its config.yaml has no 'train' section")
        return cls(model=model_config(config["model"]), train=train_config(config.get("train", {})),
                   generation=config.get("generation") or {}, preset=config.get("preset"),
                   tokenizer=config.get("tokenizer"), data=config.get("data"),
                   extra={k: v for k, v in config.items() if k not in known})

    @classmethod
    def resume(cls, run_dir: Path, settings: dict | None) -> "Run":
        """The run in run_dir, with the settings a resume may change (RESUMABLE) changed; any other is refused."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise LLMError(f"cannot resume: {run_dir} is not a run directory")
        run = cls.load(run_dir)
        for key, value in (settings or {}).items():
            if value is None:
                continue
            name = key.removeprefix("train.")
            if name not in RESUMABLE:
                raise LLMError(f"--resume keeps the run's settings; {name} cannot change "
                               f"(only {', '.join(sorted(RESUMABLE))})")
            setattr(run.train, name, value)
        run.train.check()
        return run

    def to_dict(self) -> dict:
        """What config.yaml holds (without its format line)."""
        config = {"preset": self.preset} if self.preset is not None else {}
        config |= {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}
        config |= {k: v for k, v in self.extra.items() if k in ("task", "init")}
        config["generation"] = self.generation
        for key in ("tokenizer", "data"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        config |= {k: v for k, v in self.extra.items() if k not in config}
        return config | ({"summary": self.summary} if self.summary is not None else {})

    def save(self, run_dir: Path):
        """Write run_dir/config.yaml (atomically)."""
        checkpoint.write_config(Path(run_dir), self.to_dict())


def model_config(settings: dict) -> ModelConfig:
    try:
        return ModelConfig(**settings)
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad model settings: {e}") from None


def train_config(settings: dict) -> TrainConfig:
    try:
        cfg = TrainConfig(**settings)
    except (TypeError, ValueError) as e:
        raise LLMError(f"bad settings: {e}") from None
    cfg.check()
    return cfg


@contextmanager
def locked(run_dir: Path, hold: bool = True):
    """Hold run_dir for this run while the block runs: a second run or resume into it is refused in one line.

    An exclusive flock on the directory itself: nothing is left behind, and the kernel releases it when the process
    ends however it ends (a crash, SIGKILL). hold=False (the processes of a torchrun group but process 0) holds
    nothing."""
    if not hold:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LLMError(f"{run_dir} is in use: another run is writing it; wait for that run to end (then "
                       "--resume it), or choose another directory") from None
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
