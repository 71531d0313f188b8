"""``python -m attriflow ...``: the ``attriflow`` command."""

from attriflow.flows.cli import main

raise SystemExit(main())
