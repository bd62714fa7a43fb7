"""Command-line entry points: train, plot (and, as they land, convert, generate, plan)."""
