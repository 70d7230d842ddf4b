"""File-format readers that lmforge owns instead of delegating to third-party parsers."""
