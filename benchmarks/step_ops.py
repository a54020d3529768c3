"""Shim: the benchmark lives in ddetr.bench.step_ops (`ddetr bench step-ops --help`)."""
from ddetr.bench.step_ops import main

raise SystemExit(main())
