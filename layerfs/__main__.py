"""``python -m layerfs``: the same as the ``layerfs`` command."""

from layerfs.cli import main

raise SystemExit(main())
