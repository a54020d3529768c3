"""Shim: the benchmark lives in ddetr.bench.op (`ddetr bench op --help`)."""
from ddetr.bench.op import main

raise SystemExit(main())
