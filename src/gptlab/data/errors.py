"""The error type shared by the data pipeline."""


class DataError(ValueError):
    """Bad data or configuration, described well enough to fix without a traceback.

    The CLIs catch this (and FileNotFoundError) and print just the message.
    """
