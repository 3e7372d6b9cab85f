"""## Errors a user can fix: one message, no traceback

A known user error (a setting, a data file, a folder, a package) says what is wrong, where (file, row,
column or setting) and the fix. The CLI prints just that message and exits with status 2; a notebook shows
just that message too (IPython displays what `_render_traceback_` returns instead of the traceback).
Unexpected errors keep their tracebacks.
"""


class UserError(Exception):
    """Base of the errors a user can fix; its message names the file/row/column or setting and the fix."""

    def _render_traceback_(self):
        return [f"\x1b[31m{type(self).__name__}\x1b[0m: {self}"]
