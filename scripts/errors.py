"""Errors the user can fix: each message names the file or setting and what to do."""


class UserError(Exception):
    """A bad input or setting; main.py prints the message and exits with status 2."""
