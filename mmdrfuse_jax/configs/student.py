"""Student distillation as in the published code (SPEC sections 3-5).

Adam 1e-4, batch 25, 10 epochs, 128x128 patches, loss
L_int + 2 L_percep + L_grad + 5 L_distill + L_refresh. Needs a built dataset, the converted
VGG-19 and a teacher:

  python bin/train.py --config=configs/student.py --workdir=runs/student \
    --config.data.dataset=llvip --config.data.data_dir=~/tfds \
    --config.vgg_weights=vgg19.npz --config.teacher_weights=runs/teacher/teacher.npz
"""

from mmdrfuse_jax.configs import default


def get_config():
  return default.get_config("student")
