"""Shim: the benchmark lives in ddetr.bench.paper_claims (`ddetr bench paper-claims --help`)."""
from ddetr.bench.paper_claims import main

raise SystemExit(main())
