"""`python -m rspretrain ...`: the CLI, so that `torchrun -m rspretrain train ...` works."""

from rspretrain.cli import main

main()
