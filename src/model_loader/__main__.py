"""``python -m model_loader`` runs the CLI."""

from model_loader.cli import main

raise SystemExit(main())
