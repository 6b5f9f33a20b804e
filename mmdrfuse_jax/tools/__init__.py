"""The command-line tools: `mmdrfuse-<name>` console scripts, and `python bin/<name>.py`."""
