"""The one error type meant for users: the CLI prints its message as a single line and exits non-zero."""


class LLMError(Exception):
    """A problem with the user's input (a path, a file, a setting), explained in the message."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops a command as Ctrl-C does (cleanup runs, exit 130), even where Ctrl-C only stops a reply."""


# what a training process under torchrun says when another process of its group went away (that one says why)
PEER_STOPPED = "another training process stopped"
