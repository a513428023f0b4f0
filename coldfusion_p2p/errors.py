"""Errors that reach the user as one line and an exit code."""


class UserError(Exception):
    """Bad input or a refused setting: printed as one line, exit code 2, no traceback."""

    exit_code = 2


class WorkError(Exception):
    """The work itself failed (network, peers, a round that could not complete): exit code 1."""

    exit_code = 1
