"""Teacher training as in the published code (SPEC sections 3-5).

Adam 1e-4, batch 25, 10 epochs, 128x128 patches, loss 2 L_int + L_percep + L_grad + L_refresh.

  python bin/train.py --config=configs/teacher.py --workdir=runs/teacher \
    --config.data.dataset=llvip --config.data.data_dir=~/tfds --config.vgg_weights=vgg19.npz
"""

from mmdrfuse_jax.configs import default


def get_config():
  return default.get_config("teacher")
