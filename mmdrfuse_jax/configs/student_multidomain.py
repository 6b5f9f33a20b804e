"""A student for every domain: daytime and night pairs mixed, chosen on held-out training pairs.

The published recipe (`student.py`) distils on one dataset. A student distilled on RoadScene's
daytime pairs alone goes blind in the dark: its conv1 units all switch off below a brightness
threshold and night scenes come out flat (docs/domains.md). This config trains on RoadScene
and LLVIP (night) in equal shares, with each image's exposure, gamma and contrast varied (one
draw per patch), the gradient term weighted 300,000 (without VGG-19 nothing else asks for
edges) and a term that keeps some first-layer unit on at every pixel, at lr 3e-4 for 36
epochs, and validates on 15% of each dataset's pairs held out of training, never on a test
set. `weights/student.npz` is this config's run (docs/domains.md).

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
  # One draw per patch: its teacher targets stay valid, so a CPU caches them (about 0.45 s a
  # step instead of 5 s on the development VM; docs/domains.md).
  config.data.augment.per_patch = True
  config.init.conv1_bias = 0.1
  # Without VGG-19 nothing else asks for edges: the gradient term at weight 1 is about 1e-4
  # of the gradient. Weighted 300,000 it sharpens the daytime pairs and lifts the night ones
  # too (docs/domains.md, "The alive term and the gradient weight").
  config.loss.w_grad = 300000.0
  # Keeps some conv1 unit on at every pixel (`losses.alive_loss`): without it, the rows that
  # weighted the gradient term switched every unit off on up to 17% of the night pixels.
  config.loss.w_alive = 3.0
  config.optim.lr = 3e-4
  config.num_epochs = 36
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
