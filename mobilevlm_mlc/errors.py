"""The one exception type users see: a one-line message naming the file or field at fault."""


class MobileVLMError(Exception):
    """Bad input or environment, reported as `error: <message>` by the CLI (no traceback)."""
