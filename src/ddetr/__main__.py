"""`python -m ddetr` is the same tool as the `ddetr` console script."""

from ddetr.cli.main import main

raise SystemExit(main())
