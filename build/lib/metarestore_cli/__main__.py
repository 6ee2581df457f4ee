"""``python -m metarestore_cli COMMAND ...``: what Ray jobs run on a cluster (no console script needed)."""

from metarestore_cli.app import main

main()
