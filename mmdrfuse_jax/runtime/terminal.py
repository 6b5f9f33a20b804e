"""What the tools print is text, never terminal commands: file names are data from outside.

A file named `ESC ] 0;title BEL x.png` sets the terminal's title when printed raw, and one
with `ESC [2J` clears the screen. Every message naming a file would need escaping at every
place it is built; instead a process started to run a tool writes through `SafeStream`s
(`install`, called by `mmdrfuse_jax.tools`; `safe_output()` within a block), which escape such
characters on their way out, whatever line they are in.

Kept as they are: newline and tab, and carriage return (progress bars redraw with it). Shown
as `\\xNN`/`\\uNNNN` escapes: the other C0 controls, DEL, the C1 controls (0x80-0x9f, which
some terminals obey) and the Unicode bidirectional overrides (which reorder what is shown).
"""

from __future__ import annotations

import contextlib
import re
import sys
from typing import Iterator, TextIO, cast

_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
  """`text` with the characters a terminal would obey (not show) escaped."""
  return _UNSAFE.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                else f"\\u{ord(m.group()):04x}"), text)


class SafeStream:
  """A text stream that writes `printable(text)` to the stream it wraps."""

  def __init__(self, stream: TextIO):
    self._stream = stream

  def write(self, text: str) -> int:
    self._stream.write(printable(text))
    return len(text)

  def writelines(self, lines) -> None:
    for line in lines:
      self.write(line)

  def __getattr__(self, name: str):  # flush, fileno, isatty, encoding, ...: the wrapped stream's
    return getattr(self._stream, name)


def install() -> None:
  """For the rest of the process, `sys.stdout` and `sys.stderr` escape what a terminal would
  obey (`mmdrfuse_jax.tools` does this in a process started to run a tool)."""
  if not isinstance(sys.stdout, SafeStream):
    sys.stdout = cast(TextIO, SafeStream(sys.stdout))
  if not isinstance(sys.stderr, SafeStream):
    sys.stderr = cast(TextIO, SafeStream(sys.stderr))


@contextlib.contextmanager
def safe_output() -> Iterator[None]:
  """Within the block, `sys.stdout` and `sys.stderr` escape what a terminal would obey."""
  previous = sys.stdout, sys.stderr
  # A TextIO in all that the tools use of one (write, flush, fileno, isatty, encoding).
  sys.stdout = cast(TextIO, SafeStream(previous[0]))
  sys.stderr = cast(TextIO, SafeStream(previous[1]))
  try:
    yield
  finally:
    sys.stdout, sys.stderr = previous
