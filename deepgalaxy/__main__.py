"""``python -m deepgalaxy`` runs the CLI."""

from deepgalaxy.cli import main

main()
