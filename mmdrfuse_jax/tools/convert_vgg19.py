"""Converts torchvision's VGG-19 weights to the project's format (no PyTorch needed).

  python bin/convert_vgg19.py vgg19-dcbb9e9d.pth vgg19.npz

SRC is torchvision's ImageNet `vgg19` state dict (the file torchvision caches as
`vgg19-dcbb9e9d.pth`, from https://download.pytorch.org/models/vgg19-dcbb9e9d.pth); DST is
written atomically as one `.npz` of the feature stack's float32 arrays (HWIO kernels).

Exit codes: 0 written; 1 SRC unusable or DST not writable; 130/143 stopped by SIGINT/SIGTERM
(DST is then not written, and no temporary file is left).
"""

import argparse
import sys

from mmdrfuse_jax.io import files, torch_reader
from mmdrfuse_jax.models import vgg
from mmdrfuse_jax.runtime import interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="torchvision vgg19 state dict (.pth)")
  parser.add_argument("dst", help="output .npz")
  args = parser.parse_args(argv)
  try:
    with interrupts.raise_on_signals():
      vgg.convert_torchvision_file(args.src, args.dst)
  except interrupts.Interrupted as e:
    print(f"stopped by {interrupts.signal_name(e.signum)}: {args.dst} not written",
          file=sys.stderr)
    return interrupts.exit_code(e.signum)
  except torch_reader.WeightsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except OSError as e:
    print(f"error: {args.dst}: cannot write ({files.os_error_cause(e)})", file=sys.stderr)
    return 1
  print(f"wrote {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
