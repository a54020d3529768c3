"""Benchmarks shipped with the package: `ddetr bench op | model | paper-claims` (each module has `main(argv)`)."""
