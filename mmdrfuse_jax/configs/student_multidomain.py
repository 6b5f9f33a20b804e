"""A student for every domain: daytime and night pairs mixed, chosen on held-out training pairs.

The published recipe (`student.py`) distils on one dataset. A student distilled on RoadScene's
daytime pairs alone goes blind in the dark: its conv1 units all switch off below a brightness
threshold and night scenes come out flat (docs/domains.md). This config trains on RoadScene
and LLVIP (night) in equal shares, with each image's exposure, gamma and contrast varied, and
validates on 15% of each dataset's pairs held out of training, never on a test set.

Without VGG-19 terms (perception off, refresh memories off) it needs no download: only the
built datasets and the teacher.

  python bin/prepare_data.py --dataset roadscene --manual_dir RoadScene_train --data_dir ~/tfds
  python bin/prepare_data.py --dataset llvip --manual_dir LLVIP_train --data_dir ~/tfds
  python bin/train.py --config=configs/student_multidomain.py --workdir=runs/multidomain \
    --config.data.data_dir=~/tfds --config.teacher_weights=pretrained_models/teacher.model
"""

from mmdrfuse_jax.configs import default


def get_config():
  config = without_vgg_validated_on_holdout(default.get_config("student"))
  config.data.dataset = "roadscene,llvip"
  config.data.weights = "1,1"
  config.data.augment.enabled = True
  config.init.conv1_bias = 0.1
  config.num_epochs = 12
  return config


def without_vgg_validated_on_holdout(config):
  """`config` at lr 1e-3 without VGG-19 terms, validated every 100 steps on held-out pairs.

  Shared with the ablation grid (`ablation_multidomain.py`), whose rows are this config's
  variations.
  """
  config.optim.lr = 1e-3
  # No VGG-19: perception off and no refresh memories (their losses read VGG-19's taps).
  config.loss.w_percep = 0.0
  config.refresh.ssim = False
  config.refresh.gmsd = False
  config.data.holdout = 0.15
  v = config.validation
  v.split = "holdout"
  v.max_pairs = 0
  v.every_steps = 100
  v.metrics = "VIF,Qabf,SSIM,Floor"
  config.checkpoint_every_steps = 100
  return config
