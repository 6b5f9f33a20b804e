"""Teacher training as in the published code (SPEC sections 3-5).

Adam 1e-4, batch 25, 10 epochs, 128x128 patches, loss 2 L_int + L_percep + L_grad + L_refresh.

  python bin/train.py --config=configs/teacher.py --workdir=runs/teacher \
    --config.data.dataset=llvip --config.data.data_dir=~/tfds --config.vgg_weights=vgg19.npz
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model = "teacher"
  config.loss.w_int = 2.0
  config.loss.w_percep = 1.0
  config.loss.w_grad = 1.0
  config.loss.w_distill = 0.0  # Unused by the teacher.
  return config
