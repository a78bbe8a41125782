class LoupeError(Exception):
    """A problem the user can fix; its message is shown to them as is."""
