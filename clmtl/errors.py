"""The errors clmtl reports to its user in one line, apart from the code that raises them: this module imports
nothing, so any layer (data, models, strategies, the run) can raise them and the command line can catch them."""


class ConfigError(ValueError):
    """A config file, override or value that clmtl refuses; the message is a single line."""


class DataError(ValueError):
    """A dataset file is missing, malformed, unsafe or inconsistent; the message names the file and the problem."""
