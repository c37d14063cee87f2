"""The one exception type users see as a message rather than a stack trace."""


class MtftError(Exception):
    """A problem with the user's input or config: printed as `error: <message>`, exit code 2."""
