"""User-facing errors: the CLI prints these as one clear message and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: a config field, a path, a missing dataset."""


class ConfigError(UserError):
    pass


class DataError(UserError):
    pass

