"""The Python API: the model `llm` runs, for notebooks and scripts (docs/api.md).

    import llmcli
    model = llmcli.load()  # the shipped model ($LLM_MODEL if set), or load(PATH): ours, a Hugging Face folder, .gguf
    model.generate("Once upon a time", max_new_tokens=50, temperature=0)   # -> str
    model.generate(["Once upon a time", "The dog"], seed=1)               # -> [str, str]
    for piece in model.stream("Once upon a time"): print(piece, end="")
    model.chat([{"role": "user", "content": "Tell me a story"}])          # -> str
    model.bits_per_byte("Once upon a time there was a cat.")              # -> float

The same functions as the CLI: settings from llmcli.infer.sampler.sampling_settings (unset options: the checkpoint's
defaults, as `llm generate`), decoding by llmcli.infer.engine (the one decoder), scoring by llmcli.eval.evaluate.
Bad input raises llmcli.errors.LLMError with a message written for a person.
"""

from pathlib import Path
from typing import Iterator

from llmcli.errors import LLMError
from llmcli.eval.evaluate import evaluate_text
from llmcli.formats import default_model_path, load_model
from llmcli.infer.chat import plain_text
from llmcli.infer.engine import Engine, Job
from llmcli.infer.generate import apply_template, generate_samples
from llmcli.infer.rows import encode_prompt
from llmcli.infer.sampler import SamplingConfig, sampling_settings
from llmcli.text.chat_template import find_chat_template

MAX_BATCH = SamplingConfig.batch_size  # rows decoded together, as `llm generate --batch-size`'s default


def load(path: str | Path | None = None, quantize: str | None = None, device: str = "cpu") -> "Model":
    """Load a model: our checkpoint directory, a Hugging Face folder or a .gguf file; None: the shipped model (or
    $LLM_MODEL). quantize: "int8" or "int4" (CPU). Raises LLMError for a path that is not a model."""
    net, tokenizer, config = load_model(path, device=device, quantize=quantize)
    if config.get("task") == "classify":
        raise LLMError("this checkpoint is a classifier: it labels text (llm classify), it does not generate")
    return Model(net, tokenizer, config, path if path is not None else default_model_path())


class Model:
    """A loaded language model. Sampling options (max_new_tokens, temperature, top_k, top_p, min_p,
    repetition_penalty, stop, seed, ...; the fields of llmcli.infer.sampler.SamplingConfig) default to the
    checkpoint's stored settings, as in `llm generate`; temperature=0 is greedy, and a seed gives the same text
    whatever the batch around it."""

    def __init__(self, net, tokenizer, config: dict, path: str | Path):
        self.net, self.tokenizer, self.config, self.path = net, tokenizer, config, path
        self.chat_template = find_chat_template(path, config, tokenizer)
        self.engine = Engine(net, tokenizer, max_batch=MAX_BATCH, preallocate=False)  # (kept between calls)

    def __repr__(self) -> str:
        return f"llmcli.Model({str(self.path)!r}, context={self.engine.context})"

    def generate(self, prompt: str | list[str], **options) -> str | list[str]:
        """The continuation of a prompt (str), or of each prompt of a list (a list of str, in order, decoded together).
        With num_samples=k, a list of k samples in place of each text. Raises LLMError for an option out of range or a
        prompt longer than the context (truncate=True keeps its end)."""
        prompts, truncate = [prompt] if isinstance(prompt, str) else list(prompt), options.pop("truncate", False)
        if not all(isinstance(p, str) for p in prompts):
            raise LLMError("generate takes a prompt (str) or a list of prompts")
        cfg, template = self._settings(None, options)
        texts: list[list[str]] = [[] for _ in prompts]
        for sample in generate_samples(None, self.tokenizer, prompts, cfg, truncate, engine=self.engine,
                                       template=lambda p: apply_template(template, p)):
            texts[sample.index].append(sample.text)
        out = [t[0] if cfg.num_samples == 1 else t for t in texts]
        return out[0] if isinstance(prompt, str) else out

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """The continuation of a prompt in pieces, each as soon as it is printable."""
        truncate = options.pop("truncate", False)
        cfg, template = self._settings(None, options)
        yield from self._stream(apply_template(template, prompt), cfg, truncate)

    def chat(self, messages: list[dict], **options) -> str:
        """The assistant's reply to a conversation: messages as OpenAI's ({"role": "system" | "user" | "assistant",
        "content": str}), rendered by the model's chat template (without one: the contents, a line each). The
        oldest messages must fit the context with the reply: a conversation too long keeps its end."""
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and
                                   m.get("role") in ("system", "user", "assistant") for m in messages):
            raise LLMError('chat takes a non-empty list of {"role": "system" | "user" | "assistant", '
                           '"content": str} messages')
        cfg, _ = self._settings(self.chat_template, options)
        text = self.chat_template.prompt(messages) if self.chat_template else plain_text(messages)
        return "".join(self._stream(text, cfg, truncate=True))

    def bits_per_byte(self, text: str, stride: int | None = None) -> float:
        """Bits per byte of a text (one document) as `llm eval` scores a file: the model's loss in bits over the
        text's UTF-8 bytes, windows of the context every `stride` tokens (default: half the context)."""
        return evaluate_text(self.net, self.tokenizer, text, stride=stride)["bits_per_byte"]

    def _settings(self, chat, options: dict) -> tuple[SamplingConfig, str]:
        if "stop" in options and isinstance(options["stop"], str):
            options["stop"] = (options["stop"],)
        return sampling_settings(self.config, chat, self.tokenizer, **options)

    def _stream(self, text: str, cfg: SamplingConfig, truncate: bool) -> Iterator[str]:
        if cfg.num_samples != 1:
            raise LLMError("stream and chat give one sample: num_samples must be 1")
        ids = encode_prompt(self.tokenizer, text, self.engine.context, truncate)
        pieces: list[str] = []
        job = Job([ids], cfg, lambda events: pieces.extend(e[2] for e in events if e[0] == "text"), seed=cfg.seed)
        for _ in self.engine.run([job]):
            yield from pieces
            pieces.clear()
