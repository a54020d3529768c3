"""Shim: the benchmark lives in ddetr.bench.model (`ddetr bench model --help`)."""
from ddetr.bench.model import main

raise SystemExit(main())
