"""``fgpipe`` (the console script) and ``python -m fgpipe``.

This module imports nothing heavy before it handles Ctrl-C and SIGTERM: a user who interrupts fgpipe while it is
still importing typer, numpy, pydantic or torch (about a second) gets one line and exit code 130 (143 for SIGTERM),
never a traceback. (The allocator settings of :mod:`fgpipe.runtime` are applied by the command line itself, so a
caller of :data:`fgpipe.cli.app`, CliRunner included, runs with them too.)
"""

from __future__ import annotations

import sys


def main() -> None:
    """Run the fgpipe command line (``sys.argv``); exit with its code."""
    try:
        from fgpipe import runtime

        runtime.raise_on_sigterm()  # from here on SIGTERM raises like Ctrl-C
        from fgpipe.cli import app
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM during the imports: no command has run
        _interrupted(exc, starting=True)
    try:
        app(prog_name="fgpipe")
    except SystemExit as exc:
        # Typer turns a Ctrl-C that no command reported (one while it parses the command line) into a silent
        # exit 130: report it, as the commands report theirs
        caught = _unreported_interrupt(exc)
        if caught is None:
            raise
        _interrupted(caught)
    except KeyboardInterrupt as exc:
        _interrupted(exc)


def _unreported_interrupt(exc: SystemExit) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind Typer's ``Exit(130)`` when Typer itself caught it (``raise Exit(130) from e``);
    None for every other exit (the commands raise theirs ``from None``)."""
    inner = exc.__context__
    cause = getattr(inner, "__cause__", None)
    return cause if isinstance(cause, KeyboardInterrupt) else None


def _interrupted(exc: KeyboardInterrupt, starting: bool = False) -> None:
    from fgpipe.runtime import interruption

    text, code = interruption(exc, starting=starting)
    sys.stderr.write(text + "\n")
    raise SystemExit(code) from None


if __name__ == "__main__":
    main()
