"""``python -m fastfp8``: the ``fastfp8`` command (see :mod:`fastfp8.cli`)."""

from .cli import main

raise SystemExit(main())
