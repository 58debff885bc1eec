"""One module per CLI command; each exposes a click command named `command`. Shared options in options.py."""
