"""`--verbose` and the quiet console of the commands that run Ray (pipeline.runtime.console)."""
from __future__ import annotations

import functools

import click

from pipeline.runtime.console import quiet_console


def quiet_command(name: str):
    """Run the decorated command inside `quiet_console(name)`, with a `--verbose` option that
    turns it off (Ray's and Ray Data's logs then show here as they come)."""
    def decorate(function):
        @functools.wraps(function)
        def command(*args, verbose: bool = False, **kwargs):
            with quiet_console(name, verbose=verbose):
                return function(*args, **kwargs)

        return click.option("--verbose", is_flag=True,
                            help="Show Ray's and Ray Data's logs here as they come, instead of in the run's log "
                                 "(its path is printed once).")(command)

    return decorate
