"""Sampling from a model: prefill the prompt into the KV cache, then one decode step per new token.

Sampling is a few pure functions on logits (temperature, top-k, top-p) that can be tested alone. Text is streamed
as it is produced; bytes of a character split across tokens are held back until the character is whole.
"""

import sys
from dataclasses import dataclass
from typing import Iterator, TextIO

import torch

from llmcli.errors import LLMError
from llmcli.model import Transformer
from llmcli.tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_samples: int = 1
    seed: int | None = None

    def check(self):
        if self.temperature < 0:
            raise LLMError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise LLMError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise LLMError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise LLMError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.max_new_tokens < 0:
            raise LLMError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")


def sampling_settings(checkpoint_config: dict, **options) -> tuple[SamplingConfig, str]:
    """Sampling settings and prompt template: the options given, else the checkpoint's stored defaults."""
    stored = checkpoint_config.get("generation") or {}
    template = stored.get("prompt_template", "{prompt}")
    defaults = {k: v for k, v in stored.items() if k in SamplingConfig.__dataclass_fields__}
    return SamplingConfig(**(defaults | {k: v for k, v in options.items() if v is not None})), template


def apply_template(template: str, prompt: str) -> str:
    """The prompt wrapped in the model's template; an empty prompt stays empty (the start of a document)."""
    return template.replace("{prompt}", prompt) if prompt else prompt


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= p  # tokens past the first that reaches p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits (B, vocab)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_top_p(apply_top_k(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: list[int], cfg: SamplingConfig, stop_token: int | None = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of each of cfg.num_samples samples (a (B,) tensor) per step.

    Stops after cfg.max_new_tokens, at the end of the context, or when every sample has produced stop_token
    (a finished sample keeps yielding stop_token).
    """
    context = model.config.context
    if not 0 < len(prompt) < context:
        raise ValueError(f"prompt of {len(prompt)} tokens must be 1..{context - 1}")
    steps = min(cfg.max_new_tokens, context - len(prompt))
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    tokens = torch.tensor([prompt] * cfg.num_samples, dtype=torch.long)
    finished = torch.zeros(cfg.num_samples, dtype=torch.bool)
    if use_cache:
        model.setup_kv_cache(cfg.num_samples, len(prompt) + steps)
    try:
        logits = model(tokens)[:, -1]
        for step in range(steps):
            next_token = sample_next(logits.float(), cfg, generator)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished, stop_token)
                finished |= next_token == stop_token
            yield next_token
            if finished.all() or step == steps - 1:
                break
            if use_cache:
                logits = model(next_token[:, None], pos=len(prompt) + step)[:, -1]
            else:
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                logits = model(tokens)[:, -1]
    finally:
        model.clear_kv_cache()


class TextStream:
    """Turns token ids arriving one at a time into text, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(ids) already returned

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete byte sequence; wait for the rest of the character
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int, truncate: bool) -> list[int]:
    """The prompt's ids after an end-of-text token (the start of a document), fitted into the context."""
    start = [tokenizer.end_of_text] if tokenizer.end_of_text is not None else []
    ids = start + tokenizer.encode(prompt)
    if len(ids) >= context:
        if not truncate:
            raise LLMError(f"the prompt is {len(ids)} tokens but the model's context is {context}; "
                           f"shorten it or pass --truncate to keep its last {context - 1} tokens")
        ids = ids[-(context - 1):]
    return ids


def generate_text(model: Transformer, tokenizer: Tokenizer, prompts: Iterator[str], cfg: SamplingConfig,
                  truncate: bool = False, out: TextIO = sys.stdout, log=None):
    """Write samples for each prompt to out: streamed when there is one sample; else each sample followed by a
    line `<|endoftext|>`."""
    cfg.check()
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, model.config.context, truncate)
        if log and len(ids) + cfg.max_new_tokens > model.config.context:
            log(f"the context ({model.config.context} tokens) leaves room for {model.config.context - len(ids)} "
                "new tokens")
        streams = [TextStream(tokenizer) for _ in range(cfg.num_samples)]
        done = [False] * cfg.num_samples
        for step_tokens in generate_tokens(model, ids, cfg, stop_token=tokenizer.end_of_text):
            for i, token in enumerate(step_tokens.tolist()):
                done[i] = done[i] or token == tokenizer.end_of_text
                if done[i]:
                    continue
                text = streams[i].push(token)
                if cfg.num_samples == 1 and text:
                    out.write(text)
                    out.flush()
        if cfg.num_samples == 1:
            out.write(streams[0].flush() + "\n")
        else:
            for stream in streams:
                out.write(tokenizer.decode(stream.ids) + "\n<|endoftext|>\n")
        out.flush()
