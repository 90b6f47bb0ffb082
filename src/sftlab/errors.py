"""User-facing errors: the CLI prints these as one line, without a traceback."""


class SftlabError(Exception):
    """A mistake the user can fix (bad input, bad config, missing file)."""


class DataError(SftlabError):
    """A bad record; `source` is `path:line` or `path:row N` so the user can find it."""

    def __init__(self, source: str, message: str):
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}")


class RecordError(DataError):
    """A bad record. `kind` is a short category ("unknown role", "empty content", ...) that reject
    summaries count by."""

    def __init__(self, source: str, kind: str, detail: str = ""):
        self.kind = kind
        super().__init__(source, f"{kind}: {detail}" if detail else kind)
