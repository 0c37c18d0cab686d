"""User architectures defined outside the package, compiled by tests/test_compile.py via --arch."""
