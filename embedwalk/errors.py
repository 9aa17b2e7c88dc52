"""The error embedwalk raises for bad input: it says what was wrong and how to fix it."""


class EmbedwalkError(ValueError):
    """Bad input or an unsupported model; the message names the fix."""
