"""Conversations: the model's chat template renders the messages as its prompt; a Chat keeps the history within the
context.

The template is the model's own Jinja template (llmcli/text/chat_template.py). A reply ends at the model's end token,
where the template ends an assistant turn, or where the model starts the next user turn by itself. Without a
template, a conversation is plain text: the turns one after another, a line each, and the model continues the last.
"""

from dataclasses import replace
from typing import Callable

from llmcli.errors import Terminated


def plain_text(messages: list[dict]) -> str:
    """A conversation for a model without a chat template: the messages' contents, a line each."""
    return "\n".join(m["content"] for m in messages)


class Chat:
    """A conversation with a model: each reply is generated from the history, the oldest turns dropped to fit."""

    def __init__(self, model, tokenizer, cfg, template=None, system: str | None = None, log=None, engine=None):
        """template: a ChatTemplate (llmcli/text/chat_template.py), or None for plain text; cfg: sampling settings
        with its stops (sampling_settings(..., chat=template)). engine: the model's Engine, if it has one already."""
        from llmcli.infer.engine import Engine

        self.model, self.tokenizer, self.template, self.log = model, tokenizer, template, log or (lambda m: None)
        self.cfg = replace(cfg, num_samples=1)
        self.engine = engine or Engine(model, tokenizer, max_batch=1, preallocate=False)
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages: list[dict] = []

    def reset(self):
        self.messages = []

    def prompt(self) -> str:
        """The rendered history, without its oldest turns if it would leave the reply too little room."""
        context = self.engine.context
        room = min(self.cfg.max_new_tokens, context // 2)  # tokens kept free for the reply
        dropped = 0
        while True:
            messages = self.system + self.messages
            text = self.template.prompt(messages) if self.template else plain_text(messages)
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
        from llmcli.infer.generate import generate_samples

        self.messages.append({"role": "user", "content": content})
        shown: list[str] = []

        def show(sample, text):
            shown.append(text)
            on_text(text)

        try:
            (sample,) = generate_samples(self.model, self.tokenizer, [self.prompt()], self.cfg, truncate=True,
                                         log=self.log, on_text=show, engine=self.engine)
            text = sample.text
        except Terminated:
            raise
        except KeyboardInterrupt:  # Ctrl-C stops the reply; what was shown stays in the history
            text = "".join(shown)
            self.log("(reply stopped)")
        self.messages.append({"role": "assistant", "content": text})
        return text
