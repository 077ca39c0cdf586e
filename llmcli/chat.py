"""Conversations: a chat template renders messages as the model's prompt; a Chat keeps the history within the context.

A checkpoint's config.yaml may hold `generation.chat_template`, a mapping of format strings with `{content}`:
`system`, `user`, `assistant` (each a whole turn) and `assistant_prefix` (what starts the model's reply). The reply
ends at the end-of-text token. Without a template, a conversation is plain text: the turns one after another, a
line each, and the model continues the last.
"""

from dataclasses import replace
from typing import Callable

from llmcli.errors import LLMError, Terminated

ROLES = ("system", "user", "assistant")


def render(template: dict | None, messages: list[dict], add_prefix: bool = True) -> str:
    """The prompt for messages [{"role": ..., "content": ...}]; add_prefix starts the assistant's reply."""
    if not template:
        return "\n".join(m["content"] for m in messages)
    parts = []
    for m in messages:
        if m["role"] not in ROLES or m["role"] not in template:
            raise LLMError(f"the chat template has no {m['role']!r} turn")
        parts.append(template[m["role"]].replace("{content}", m["content"]))  # replace: braces in text are text
    if add_prefix:
        parts.append(template.get("assistant_prefix", ""))
    return "".join(parts)


def chat_template(config: dict) -> dict | None:
    template = (config.get("generation") or {}).get("chat_template")
    if template is not None and not isinstance(template, dict):
        raise LLMError("generation.chat_template in config.yaml must be a mapping of format strings")
    return template


def turn_stop(template: dict | None) -> tuple[str, ...]:
    """A reply ends if the model starts the user's next turn by itself."""
    start = (template or {}).get("user", "").split("{content}")[0]
    return (start,) if start.strip() else ()


class Chat:
    """A conversation with a model: each reply is generated from the history, the oldest turns dropped to fit."""

    def __init__(self, model, tokenizer, cfg, template: dict | None = None, system: str | None = None, log=None):
        self.model, self.tokenizer, self.template, self.log = model, tokenizer, template, log or (lambda m: None)
        self.cfg = replace(cfg, num_samples=1, stop=tuple(cfg.stop) + turn_stop(template))
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = []

    def reset(self):
        self.messages = []

    def prompt(self) -> str:
        """The rendered history, without its oldest turns if it would leave the reply too little room."""
        context = self.model.config.context
        room = min(self.cfg.max_new_tokens, context // 2)  # tokens kept free for the reply
        dropped = 0
        while True:
            text = render(self.template, self.system + self.messages)
            if 1 + len(self.tokenizer.encode(text)) <= context - room:  # 1: the end-of-text token before it
                break
            if len(self.messages) <= 1:  # the new message alone is too long: its end is kept (said by generate)
                break
            drop = 2 if self.messages[0]["role"] == "user" and len(self.messages) > 2 else 1
            self.messages, dropped = self.messages[drop:], dropped + drop
        if dropped:
            self.log(f"dropped the {dropped} oldest messages of the conversation to fit the context "
                     f"({context} tokens)")
        return text

    def reply(self, content: str, on_text: Callable[[str], None]) -> str:
        """Add the user's message, stream the model's reply through on_text, add it to the history and return it."""
        from llmcli.generate import generate_samples

        self.messages.append({"role": "user", "content": content})
        shown: list[str] = []

        def show(sample, text):
            shown.append(text)
            on_text(text)

        try:
            (sample,) = generate_samples(self.model, self.tokenizer, [self.prompt()], self.cfg, truncate=True,
                                         log=self.log, on_text=show)
            text = sample.text
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C stops the reply; what was shown stays in the history
            text = "".join(shown)
            self.log("(reply stopped)")
        self.messages.append({"role": "assistant", "content": text})
        return text
