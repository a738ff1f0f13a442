"""The one exception a user can cause: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a path, an id, a flag): the message says what is wrong and how to fix it."""
