"""The errors embedwalk raises: each says what was wrong and how to fix it."""


class EmbedwalkError(ValueError):
    """Bad input or an unsupported model; the message names the fix."""


class ArchitectureError(EmbedwalkError):
    """A model whose architecture embedwalk cannot read exactly, found by the adapter's
    load-time self-check or by a capability that needs what the architecture lacks. The
    message names the model class, TransformerLens architecture, generation/mode, the check,
    the gap against its tolerance and the suspected reason."""


class EmbedwalkWarning(UserWarning):
    """Input that runs but probably does not mean what was intended (e.g. a target word
    without the leading space the tokenizer gives words after a space); the message names
    the likelier reading."""
