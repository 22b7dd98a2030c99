"""Exceptions that carry an exit code, and the exit codes.

The CLI maps them to exit codes; nothing else in the package calls sys.exit.
"""

EXIT_FAILED = 1  # a check failed, or quantization failed at run time
EXIT_BAD_INPUT = 2  # the user gave us something we cannot use
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it


class QwenGPTQError(Exception):
    exit_code = EXIT_FAILED


class BadInput(QwenGPTQError):
    """The user's input (flags, files, model) is unusable. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class QuantizationFailed(QwenGPTQError):
    """Something went wrong while quantizing. Exit code 1."""

    exit_code = EXIT_FAILED
