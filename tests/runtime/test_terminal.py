"""runtime/terminal.py: what the tools print cannot command the terminal."""

import io
import sys

from mmdrfuse_jax.runtime import terminal


def test_printable_escapes_what_a_terminal_obeys():
  assert terminal.printable("a\x1b]0;title\x07b") == "a\\x1b]0;title\\x07b"
  assert terminal.printable("\x1b[2J\x9b\x7f\u202eabc\u2066") == (
      "\\x1b[2J\\x9b\\x7f\\u202eabc\\u2066")
  kept = "line\nnext\tcol\rredraw é 漢字 🙂"
  assert terminal.printable(kept) == kept


def test_safe_output_wraps_and_restores_the_streams():
  out, err = io.StringIO(), io.StringIO()
  sys_out, sys_err = sys.stdout, sys.stderr
  sys.stdout, sys.stderr = out, err
  try:
    with terminal.safe_output():
      print("fused \x1b[2Jx.png")
      print("error: \x1b]0;pwned\x07.png", file=sys.stderr)
      assert sys.stdout.encoding == out.encoding
    assert sys.stdout is out and sys.stderr is err
  finally:
    sys.stdout, sys.stderr = sys_out, sys_err
  assert out.getvalue() == "fused \\x1b[2Jx.png\n"
  assert err.getvalue() == "error: \\x1b]0;pwned\\x07.png\n"
