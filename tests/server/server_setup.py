"""Constants shared by the server tests and their conftest (imported by name: conftest
modules of several folders cannot be imported from test files reliably)."""

API_KEY = "test-key-0123456789"
ADAPTERS = ["a0", "a1", "a2", "a3"]
TINY_FIXED = ["t0", "t1", "t2", "t3"]  # loaded when the tiny server starts
TINY_RUNTIME = ["r0", "r1", "r2", "r3"]  # under its adapter root, loaded and unloaded by tests
REPORT: list[str] = []  # lines printed after the run by conftest's pytest_terminal_summary
