"""The errors every layer may raise, in a leaf module so that no component imports the config
to raise one."""


class ConfigError(ValueError):
    """A bad config or bad input; the message is one line naming the key and the fix."""


class NonFiniteError(RuntimeError):
    """The aggregate would hold NaN/Inf: the rule cannot absorb the non-finite rows it was given."""
