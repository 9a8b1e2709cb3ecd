"""jetserve's tests; see tests/README.md. A package so `tests.support` imports by name."""
