"""Helpers every floor uses: errors, dtypes, text, JSON, the home folder, progress, memory, C builds."""
