"""The `ddetr` command-line tool."""
