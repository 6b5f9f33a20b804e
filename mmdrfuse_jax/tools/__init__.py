"""The command-line tools: `mmdrfuse-<name>` console scripts, and `python bin/<name>.py`.

Imported before any tool's own imports (jax takes seconds), this installs the start-up signal
guard when the process was started to run a tool (`runtime.startup`): SIGINT/SIGTERM before the
tool handles them itself end it with one line and exit code 130/143, not a traceback; and it
makes what the tool prints text (`runtime.terminal`: file names with control characters are
printed escaped, never obeyed by the terminal).
"""

import pkgutil

from mmdrfuse_jax.runtime import startup, terminal

if startup.started_as_tool(module.name for module in pkgutil.iter_modules(__path__)):
  startup.install()
  terminal.install()
