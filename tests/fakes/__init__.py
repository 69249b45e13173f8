"""In-memory fakes for unit tests (not shipped in the package)."""
