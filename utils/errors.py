"""Exit codes and the one exception type that the command-line scripts turn into a one-line error."""

EXIT_OK = 0
EXIT_SOME_INPUTS_FAILED = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix (bad model, bad file, missing download).

    The message is one line: what is wrong and what to do. Scripts print it as
    ``error: <message>`` and exit with ``exit_code``.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


class ImageError(UserError):
    """One input image could not be read; the batch goes on without it."""

    def __init__(self, message: str):
        super().__init__(message, EXIT_SOME_INPUTS_FAILED)
