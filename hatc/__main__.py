"""``python -m hatc`` runs the CLI."""

from hatc.cli import main

main()
