"""``python -m silo``: same as the ``silo`` console script."""

from silo.cli import main

raise SystemExit(main())
