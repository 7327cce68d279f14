"""Command-line entrypoints and the HTTP layer."""
