"""User-facing errors.

Anything the user can fix (a path, a config, a plan, a corrupt file) is raised as
`D2MError`: the CLI prints its one-line message and exits with status 2, with no
traceback unless --verbose. Everything else is a bug and keeps its traceback.
"""


class D2MError(Exception):
    """An error in the user's input, reported as one line: what is wrong and where."""

    exit_code = 2
