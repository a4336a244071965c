"""Errors meant for the person who ran the command: one line that names the file, row or option.

- `UsageError` (exit status 2): the command as given cannot run, and nothing was done:
  a missing IN, an OUT that is not n2n's, IN and OUT that overlap, an unwritable OUT,
  a bad option value, a `--model` that is not a usable checkpoint.
- `JobError` (exit status 1): the job started and stopped early (disk full); what it did
  is in its summary and manifest, and a rerun resumes.

Inputs that fail (a bad image, a refused key) are neither: they are listed in the
summary and the manifest, the job goes on, and the command exits with status 1.
The command line prints these errors as one line without a traceback
(`pipeline.commands.friendly_errors`); library callers catch them like any exception.
"""
from __future__ import annotations


class UserError(Exception):
    """An error whose message is complete for a user; `exit_code` is the command's status."""

    exit_code = 1


class UsageError(UserError, ValueError):
    """The command cannot run as given; nothing was done (exit status 2)."""

    exit_code = 2


class JobError(UserError):
    """The job stopped early; its summary says what was and was not done (exit status 1)."""

    exit_code = 1
