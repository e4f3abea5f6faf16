"""Constants shared by the server tests and their conftest (imported by name: conftest
modules of several folders cannot be imported from test files reliably)."""

API_KEY = "test-key-0123456789"
ADAPTERS = ["a0", "a1", "a2", "a3"]
