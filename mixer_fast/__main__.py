"""``python -m mixer_fast`` is the ``mixer-fast`` command."""
from .cli import main

raise SystemExit(main())
