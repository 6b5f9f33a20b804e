"""Student distillation with the settings stated in the paper instead of the code's.

Paper (Sec. 4.1.2 and 5): batch 30, 30 epochs, distillation normalised per sample (Eq. 1), and
the loss weights gamma=2, delta=1, theta=0.1. We read them as the weights of the perception,
gradient and distillation terms: L_int + 2 L_percep + 1 L_grad + 0.1 L_distill + L_refresh
(the code's weights are 2, 1 and 5).
"""

from mmdrfuse_jax.configs import default


def get_config():
  config = default.get_config("student")
  config.batch_size = 30
  config.num_epochs = 30
  config.loss.w_percep = 2.0  # gamma
  config.loss.w_grad = 1.0  # delta
  config.loss.w_distill = 0.1  # theta
  config.loss.distill_normalize = "sample"
  return config
