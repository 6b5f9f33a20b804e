"""Builds a fusion dataset from its downloaded folder and prints its image and patch counts.

  python bin/prepare_data.py --dataset roadscene --manual_dir ~/data/RoadScene --data_dir ~/tfds

Run again with the same arguments to just print the counts: the build is reused ("already
built") while the folder's image files (names, sizes, modification times) and the build
options are those it was built from, and rebuilt otherwise (one line says why; the earlier
build is kept until the new one is complete).
`--dataset paired_folders --ir_folder A --vis_folder B` reads any two folders of pairs.

Exit codes: 0 built or reused; 2 a path or the folder's pairs cannot be used (nothing is
written); 1 the build failed midway (disk full, permissions; nothing half-written is kept);
130/143 stopped by SIGINT/SIGTERM (nothing half-written is kept).
"""

import argparse
import os
import sys
import tempfile

from mmdrfuse_jax.data import builders, catalog, prepare, sources
from mmdrfuse_jax.runtime import interrupts


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", required=True, choices=catalog.CONFIG_NAMES)
  parser.add_argument("--manual_dir",
                      help="the folder holding the downloaded pairs (required to build)")
  parser.add_argument("--data_dir",
                      help="where the built dataset goes (TFDS data_dir; required to build)")
  parser.add_argument("--skip_bad", action="store_true",
                      help="leave out bad pairs instead of failing")
  resize = parser.add_mutually_exclusive_group()
  resize.add_argument("--resize_visible", dest="resize_visible", action="store_const", const=True,
                      default=None,
                      help=("resize visible images of another size to the infrared size "
                            "(default: on for roadscene only)"))
  resize.add_argument("--no_resize_visible", dest="resize_visible", action="store_const",
                      const=False,
                      help="never resize: a visible image of another size makes a bad pair")
  parser.add_argument("--ir_folder", help="paired_folders: sub-folder of infrared-slot images")
  parser.add_argument("--vis_folder", help="paired_folders: sub-folder of visible-slot images")
  parser.add_argument("--patch_size", type=int, default=128)
  parser.add_argument("--patch_stride", type=int, default=128)
  parser.add_argument("--instructions", action="store_true",
                      help="print where to get the dataset and its layout, then exit")
  args = parser.parse_args(argv)
  if args.instructions:
    # Nothing is written: the builder is only asked for its text.
    print(builders.make_builder(args.dataset, args.data_dir or tempfile.gettempdir())
          .MANUAL_DOWNLOAD_INSTRUCTIONS)
    return 0
  if not args.manual_dir or not args.data_dir:
    parser.error("--manual_dir and --data_dir are required to build a dataset")
  if args.patch_size < 1 or args.patch_stride < 1:
    print("error: --patch_size and --patch_stride must be positive", file=sys.stderr)
    return 2

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  from mmdrfuse_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about its own temporary folders.
  try:
    with interrupts.raise_on_signals():
      built = prepare.prepare(
          args.dataset, os.path.expanduser(args.manual_dir), os.path.expanduser(args.data_dir),
          skip_bad=args.skip_bad, resize_visible=args.resize_visible, ir_folder=args.ir_folder,
          vis_folder=args.vis_folder, report=print)
  except prepare.BuildError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except sources.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except interrupts.Interrupted as e:
    print(f"stopped by {interrupts.signal_name(e.signum)}; nothing half-written was kept",
          file=sys.stderr)
    return interrupts.exit_code(e.signum)
  print(f"{built.status}: {built.data_dir}")
  if built.skipped:
    print(sources.format_report(built.skipped, skipped=True))
  for split, stems in sorted(built.resized.items()):
    if stems:
      print(f"{split}: {len(stems)} visible image(s) resized to their infrared size")
  for split, images in sorted(built.images.items()):
    patches = pipeline.count_patches([(h, w) for _, h, w in images], args.patch_size,
                                     args.patch_stride)
    print(f"{split}: {len(images)} images, {patches} patches")
  return 0


if __name__ == "__main__":
  sys.exit(main())
