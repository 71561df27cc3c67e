"""One error type for everything a user can get wrong: the CLI prints its message as one line and exits 2."""


class Gemma4Error(Exception):
    """A problem with the user's input (checkpoint, bundle, arguments). The message names what and where."""
