"""User-facing errors: the CLI prints these as one line, without a traceback."""


class SftlabError(Exception):
    """A mistake the user can fix (bad input, bad config, missing file)."""


class DataError(SftlabError):
    """A bad record; `source` is `path:line` or `path:row N` so the user can find it."""

    def __init__(self, source: str, message: str):
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}")
