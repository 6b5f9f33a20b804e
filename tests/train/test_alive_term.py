"""The alive term in the train step (`config.loss.w_alive`): it revives a student whose conv1
units are all off on dark inputs, and changes nothing when its weight is 0."""

import jax
import jax.numpy as jnp
import numpy as np

from mmdrfuse_jax.train import losses, refresh, update


def _one_step(w_alive: float):
  weights = losses.LossWeights(w_int=1.0, w_percep=0.0, w_grad=0.0, w_distill=0.0,
                               w_refresh=0.0, w_alive=w_alive)
  cfg = update.StepConfig(model="student", weights=weights,
                          refresh=refresh.RefreshConfig(memories=()))
  # conv1's biases well below 0: on these dark patches every unit is off at every pixel.
  state = update.create_train_state("student", update.make_optimizer(1e-2), jax.random.key(0),
                                    num_patches=2, patch_size=16, refresh_cfg=cfg.refresh,
                                    conv1_bias=-0.5)
  dark = jax.random.uniform(jax.random.key(1), (2, 16, 16, 2), maxval=0.05)
  batch = {"ir": dark[..., :1], "vis": dark[..., 1:], "patch_id": jnp.arange(2)}
  new, metrics = jax.jit(update.train_step, static_argnames="cfg")(
      state, batch, update.Frozen(vgg=None), cfg=cfg)
  return state, new, metrics


def test_the_alive_term_lifts_the_biases_of_a_student_dead_on_dark_inputs():
  state, new, metrics = _one_step(10.0)
  assert float(metrics["l_alive"]) > 0.5  # 0.05 - (-0.5 + a small weighted sum)
  np.testing.assert_allclose(metrics["loss"], metrics["l_int"] + 10 * metrics["l_alive"],
                             rtol=1e-6)
  # All units off: the intensity term's gradient cannot reach conv1; the alive term's can.
  before, after = state.params["conv1"]["bias"], new.params["conv1"]["bias"]
  assert float(jnp.max(after - before)) > 0
  _, dead_new, dead_metrics = _one_step(0.0)
  assert "l_alive" not in dead_metrics
  np.testing.assert_array_equal(dead_new.params["conv1"]["bias"], before)
