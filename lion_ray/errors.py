"""Errors a user can fix. Their messages name the file, line or field and say what to do;
the CLI prints them on one line (no traceback) and exits non-zero."""


class LionError(Exception):
    """Base of every user-fixable error."""


class OutputRejected(LionError):
    """A stage's output failed its check (too many failed rows, unreadable reviews): what it
    wrote so far must not be reused by a rerun, which redoes it after the fix."""


def user_error(exc: BaseException) -> LionError | None:
    """The user-fixable error behind ``exc``, as it was raised: Ray re-raises a worker's
    exception wrapped (its class also derives from the original, and its text carries the
    worker's traceback), and a stage may wrap one in another. None when there is none:
    that is a bug, and its traceback is the report."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # a RayTaskError's original exception
        if isinstance(e, LionError) and not isinstance(cause, BaseException):
            return e
        stack += [e.__cause__, e.__context__]
        if isinstance(cause, BaseException):
            stack.append(cause)
    return None
