"""Errors a user can fix. Their messages name the file, line or field and say what to do;
the CLI prints them on one line (no traceback) and exits non-zero."""


class LionError(Exception):
    """Base of every user-fixable error."""
