"""The process around the library: backend selection, signals, command-line helpers."""
