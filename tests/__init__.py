"""The test suite. A regular package, imported as `tests` by pytest (root on `sys.path` first), so that
no third-party `tests` package can shadow its helpers. The source folders beside it are deliberately
not regular packages (tests/test_names.py)."""
