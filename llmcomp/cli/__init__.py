"""The ``llmcomp`` command (``main``; the commands themselves are in ``app``)."""
import sys


def main() -> None:
    """Entry point: an interrupt while the command line loads (torch, transformers: a second or more) is one line
    and exit 130, as it is once a command runs (``app.run``)."""
    try:
        from llmcomp.cli.app import app
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted.\n")
        raise SystemExit(130) from None
    app()
