"""The one exception type of ``ring-train``'s config checks."""


class ConfigError(ValueError):
    """A value in the composed config is invalid; the message names the key."""
