"""One module per ``omnidiff`` subcommand (``NAME``, ``HELP``, ``register(parser)``)."""

from omnidiff import UserError


class CommandError(UserError):
    """A failure to report to the user in one line (no traceback)."""
