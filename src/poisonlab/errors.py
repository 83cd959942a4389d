"""Exceptions with messages that name the offending file, field or parameter."""


class PoisonlabError(Exception):
    """Base class for every error poisonlab raises on bad input."""


class DataError(PoisonlabError):
    """A dataset file is missing, corrupt or of the wrong format."""


class UnsafePickleError(DataError):
    """A pickle asked to build something the restricted unpickler does not allow."""


class ConfigError(PoisonlabError):
    """An experiment config is invalid."""


class ParameterError(PoisonlabError, ValueError):
    """A parameter of an attack, defence or model is outside its allowed range."""


class CacheError(PoisonlabError):
    """An artifact-cache entry is damaged or the cache folder is unusable; the message names the file."""
