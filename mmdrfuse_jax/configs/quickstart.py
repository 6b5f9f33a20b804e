"""Quickstart: teacher, then the student distilled from it, on procedural pairs, in minutes.

No files needed: the training pairs come from `mmdrfuse_jax.data.synthetic`, and without
`--config.vgg_weights` the perception losses use a seeded random VGG-19 (the log says so; with
random features the perception terms are only structural stand-ins, so use real weights for a
real model). Writes WORKDIR/teacher/teacher.npz and WORKDIR/student/student.npz:

  python bin/train.py --config=configs/quickstart.py --workdir=/tmp/qs
  python bin/fuse.py --weights /tmp/qs/student/student.npz ...
"""

from mmdrfuse_jax.configs import default


def _small(config):
  config.data.synthetic_pairs = 8
  config.data.synthetic_height = 128
  config.data.synthetic_width = 128
  config.data.patch_size = 64
  config.data.patch_stride = 64  # 8 pairs x 4 patches = 32 patches.
  config.batch_size = 8
  config.allow_random_vgg = True
  config.optim.lr = 1e-3  # Few steps: a larger step size than the published 1e-4.
  config.log_every_steps = 4
  config.checkpoint_every_steps = 4
  return config


def get_config():
  config = _small(default.get_config("student"))
  config.num_epochs = 4  # Epoch 1 fills the refresh memories; later epochs use them.
  # Two procedural pairs held out of training, fused and scored every 8 steps and at the end;
  # the parameters of the best VIF are kept (WORKDIR/student/student_best_VIF.npz).
  config.validation.synthetic_pairs = 2
  config.validation.every_steps = 8
  config.validation.metrics = "VIF,Qabf,SSIM"
  config.validation.num_images = 2
  config.validation.best_metric = "VIF"
  config.optim.lr = 1e-2  # 113 parameters and 16 steps: large enough to visibly distil.

  # The teacher stage that runs first (into WORKDIR/teacher); the student then distils from
  # WORKDIR/teacher/teacher.npz (into WORKDIR/student).
  teacher = _small(default.get_config("teacher"))
  teacher.num_epochs = 3
  del teacher["data"]  # Both stages train on the run's `config.data` (see stages.py).
  config.teacher_stage = teacher
  return config
