"""The one error type users see: the CLI prints its message (no traceback) and exits non-zero."""


class BitlabError(Exception):
    """A problem with the user's input or environment, worded for the user.

    Messages name the culprit (file, row, field or key) so that the user can fix it without
    reading the source.
    """


class ConfigError(BitlabError):
    """A setting whose value no run can use. The message names the setting as a Python caller
    writes it (`base_lr must be a positive number, got -1`); the CLI says the flag that set it
    instead (`worded("--base-lr")`). `message` may place the name with `{setting}`, else it follows it."""

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        self.template = message if "{setting}" in message else "{setting} " + message
        super().__init__(self.worded(setting))

    def worded(self, name: str) -> str:
        """The message with the setting called `name`."""
        return self.template.replace("{setting}", name)

    def __reduce__(self):  # pickles whole (errors travel between ranks: `distributed.main_rank_call`)
        return type(self), (self.setting, self.template)
