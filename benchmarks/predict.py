"""Shim: the benchmark lives in ddetr.bench.predict (`ddetr bench predict --help`)."""
from ddetr.bench.predict import main

raise SystemExit(main())
