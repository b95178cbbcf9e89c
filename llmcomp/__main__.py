"""``python -m llmcomp`` = the ``llmcomp`` command."""
from llmcomp.cli.app import main

main()
