"""Shim: the benchmark lives in ddetr.bench.contention (`ddetr bench contention --help`)."""
from ddetr.bench.contention import main

raise SystemExit(main())
