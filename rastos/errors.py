"""The one error type a user sees: a message and, where one exists, a hint at the fix."""


class RastosError(Exception):
    """An error the user can act on. The top-level handler prints it without a traceback."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\nhint: {self.hint}"


class CommandError(RastosError):
    """An external command exited with a failure status."""

    def __init__(self, argv: list[str], returncode: int, output_tail: str) -> None:
        shown = " ".join(argv)
        message = f"command failed with exit status {returncode}: {shown}"
        if output_tail:
            message += "\n--- last lines of its output ---\n" + output_tail
        super().__init__(message)
        self.argv = argv
        self.returncode = returncode
        self.output_tail = output_tail
