"""``python -m llmcomp`` = the ``llmcomp`` command."""
from llmcomp.cli import main

main()
