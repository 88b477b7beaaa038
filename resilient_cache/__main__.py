"""``python -m resilient_cache`` is the ``resilient-cache`` command."""

from resilient_cache.cli import main

raise SystemExit(main())
