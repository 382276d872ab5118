"""Command line: one module per command group; each parses, validates and calls the API."""
