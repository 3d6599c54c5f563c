"""The Typer layer: one module per command; each parses options, calls one core function and renders."""
