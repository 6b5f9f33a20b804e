"""The ablation grid behind docs/domains.md: why a student trained on RoadScene goes blind at night.

Every row distils the student from a given teacher without VGG-19 terms (perception and
refresh memories off: ImageNet's VGG-19 needs a download), at Adam lr 1e-3, and validates
every 100 steps on the same 35 pairs: the 15% of RoadScene_train and of LLVIP_train that
`data.holdout` keeps out of training (`validation.datasets`), also for the rows that train on
RoadScene alone. The rows differ in what their names say; "short" rows train about 600 steps
(16 epochs of RoadScene's patches, or 5 of the 1:1 mixture's), "long" rows 12 epochs of the
mixture (1,476 steps), with augmentation and conv1's biases started at +0.1:

  python bin/prepare_data.py --dataset roadscene --manual_dir RoadScene_train --data_dir ~/tfds
  python bin/prepare_data.py --dataset llvip --manual_dir LLVIP_train --data_dir ~/tfds
  python bin/ablate.py --grid=configs/ablation_multidomain.py --workdir=runs/ablation \\
      --grid.data.data_dir=~/tfds --grid.teacher_weights=pretrained_models/teacher.model
  python bin/ablate.py --grid=configs/ablation_multidomain.py:long --workdir=runs/ablation_long ...
"""

from mmdrfuse_jax.configs import default, student_multidomain

_MIXTURE = {"data.dataset": "roadscene,llvip", "data.weights": "1,1", "num_epochs": 5}
_RECIPE = {**_MIXTURE, "data.augment.enabled": True, "init.conv1_bias": 0.1}  # Shipped.

SHORT = {
    "roadscene": {},
    "roadscene_lr1e-4": {"optim.lr": 1e-4},
    "roadscene_bias0.1": {"init.conv1_bias": 0.1},
    "roadscene_teacher_perception": {"loss.perception": "teacher", "loss.w_percep": 2.0},
    "roadscene_augment": {"data.augment.enabled": True},
    "mixture": _MIXTURE,
    # The gradient term is about 1e-4 of the intensity term at weight 1 (it is a mean square
    # of Laplacians, divided by 10): without VGG-19, nothing else asks for edges.
    "mixture_wgrad100": {**_MIXTURE, "loss.w_grad": 100.0},
    "mixture_wgrad1000": {**_MIXTURE, "loss.w_grad": 1000.0},
    "mixture_wgrad10000": {**_MIXTURE, "loss.w_grad": 10000.0},
    "mixture_augment_bias": _RECIPE,
    "mixture_augment_bias_wint0.5": {**_RECIPE, "loss.w_int": 0.5},
}
# 12 epochs of the mixture (1,476 steps), as long as the student shipped first.
_LONG = {**_RECIPE, "num_epochs": 12}
_PER_PATCH = {**_LONG, "data.augment.per_patch": True}
LONG = {
    "recipe": _LONG,
    "recipe_per_patch": _PER_PATCH,
    "recipe_per_patch_wgrad1000": {**_PER_PATCH, "loss.w_grad": 1000.0},
    "recipe_per_patch_wgrad10000": {**_PER_PATCH, "loss.w_grad": 10000.0},
    "recipe_per_patch_cosine": {**_PER_PATCH, "optim.schedule": "cosine",
                                "optim.warmup_steps": 100},
    "recipe_per_patch_lr1e-4": {**_PER_PATCH, "optim.lr": 1e-4},
    # The gradient weight that lifted every score, with a smaller or decaying step: at lr
    # 1e-3 its dead units came and went (5% at step 800).
    "recipe_per_patch_wgrad10000_cosine": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "optim.schedule": "cosine", "optim.warmup_steps": 100},
    "recipe_per_patch_wgrad10000_lr3e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "optim.lr": 3e-4},
    # With the teacher's targets on disk (`teacher_cache_dir`) a row of 1,476 steps takes
    # about 3 min on the development VM: the neighbours of the best row, and longer runs.
    "recipe_per_patch_wgrad3000": {**_PER_PATCH, "loss.w_grad": 3000.0},
    "recipe_per_patch_wgrad10000_lr5e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "optim.lr": 5e-4},
    "recipe_per_patch_wgrad30000_lr3e-4": {**_PER_PATCH, "loss.w_grad": 30000.0,
                                           "optim.lr": 3e-4},
    "recipe_per_patch_wgrad10000_lr3e-4_36epochs": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                    "optim.lr": 3e-4, "num_epochs": 36},
    # Every row that validated higher than the shipped student has dead units on night
    # scenes: against them, more pull toward the teacher (which has none) or less toward
    # max(ir, vis).
    "recipe_per_patch_wgrad10000_wdistill20": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                               "loss.w_distill": 20.0},
    "recipe_per_patch_wgrad10000_wdistill20_lr3e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                      "loss.w_distill": 20.0, "optim.lr": 3e-4},
    "recipe_per_patch_wgrad10000_wint0.5": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                            "loss.w_int": 0.5},
    # The units die on night scenes: more of them in every batch.
    "recipe_per_patch_wgrad10000_llvip2": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "data.weights": "1,2"},
    "recipe_per_patch_wgrad10000_llvip3": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "data.weights": "1,3"},
    # Fewer dead units with more night scenes (1.5% of LLVIP's pixels, from 8.5%): with the
    # two other settings that lowered them.
    "recipe_per_patch_wgrad10000_llvip2_lr5e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                  "data.weights": "1,2", "optim.lr": 5e-4},
    "recipe_per_patch_wgrad10000_llvip3_lr5e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                  "data.weights": "1,3", "optim.lr": 5e-4},
    "recipe_per_patch_wgrad10000_llvip3_wdistill20": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                      "data.weights": "1,3",
                                                      "loss.w_distill": 20.0},
    "recipe_per_patch_wgrad10000_llvip2_lr3e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                  "data.weights": "1,2", "optim.lr": 3e-4},
    "recipe_per_patch_wgrad10000_llvip3_lr3e-4": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                  "data.weights": "1,3", "optim.lr": 3e-4},
    # At the cause: a term that keeps some conv1 unit on at every pixel (`losses.alive_loss`),
    # on the best-validating row, whose units die on 8.5% of LLVIP's pixels.
    "recipe_per_patch_wgrad10000_alive3": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                           "loss.w_alive": 3.0},
    "recipe_per_patch_wgrad10000_alive10": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                            "loss.w_alive": 10.0},
    "recipe_per_patch_wgrad10000_alive30": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                            "loss.w_alive": 30.0},
    # The term removed the dead units but not the night scenes' loss (LLVIP VIF 0.69, from
    # 0.74): on the rows that kept LLVIP best but had dead units.
    "recipe_per_patch_wgrad30000_lr3e-4_alive3": {**_PER_PATCH, "loss.w_grad": 30000.0,
                                                  "optim.lr": 3e-4, "loss.w_alive": 3.0},
    "recipe_per_patch_wgrad10000_llvip2_alive3": {**_PER_PATCH, "loss.w_grad": 10000.0,
                                                  "data.weights": "1,2", "loss.w_alive": 3.0},
    "recipe_per_patch_wgrad30000_lr3e-4_alive10": {**_PER_PATCH, "loss.w_grad": 30000.0,
                                                   "optim.lr": 3e-4, "loss.w_alive": 10.0},
    # Around the first row to hold both domains with no dead units: longer, more night
    # scenes, more gradient weight.
    "recipe_per_patch_wgrad30000_lr3e-4_alive3_36epochs": {
        **_PER_PATCH, "loss.w_grad": 30000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0,
        "num_epochs": 36},
    "recipe_per_patch_wgrad30000_lr3e-4_llvip2_alive3": {
        **_PER_PATCH, "loss.w_grad": 30000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0,
        "data.weights": "1,2"},
    "recipe_per_patch_wgrad100000_lr3e-4_alive3": {
        **_PER_PATCH, "loss.w_grad": 100000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0},
    # More gradient weight lifted the night scenes too (LLVIP VIF 1.048 at 100,000), and
    # more steps the daytime ones (RoadScene 0.665 at 36 epochs): both together, and more.
    "recipe_per_patch_wgrad100000_lr3e-4_alive3_36epochs": {
        **_PER_PATCH, "loss.w_grad": 100000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0,
        "num_epochs": 36},
    "recipe_per_patch_wgrad300000_lr3e-4_alive3": {
        **_PER_PATCH, "loss.w_grad": 300000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0},
    "recipe_per_patch_wgrad300000_lr3e-4_alive3_36epochs": {
        **_PER_PATCH, "loss.w_grad": 300000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0,
        "num_epochs": 36},
    "recipe_per_patch_wgrad1000000_lr3e-4_alive3": {
        **_PER_PATCH, "loss.w_grad": 1000000.0, "optim.lr": 3e-4, "loss.w_alive": 3.0},
    # After the choice (the 36-epoch row at 300,000 is shipped): is the alive term still
    # needed at that gradient weight?
    "recipe_per_patch_wgrad300000_lr3e-4": {
        **_PER_PATCH, "loss.w_grad": 300000.0, "optim.lr": 3e-4},
    "recipe_per_patch_wgrad300000_lr3e-4_36epochs": {
        **_PER_PATCH, "loss.w_grad": 300000.0, "optim.lr": 3e-4, "num_epochs": 36},
}


def base_config():
  """What every row shares: the student on RoadScene_train, no VGG-19, held-out validation."""
  config = student_multidomain.without_vgg_validated_on_holdout(default.get_config("student"))
  config.data.dataset = "roadscene"
  config.num_epochs = 16
  config.validation.datasets = "roadscene,llvip"  # Every row on the same pairs.
  config.log_every_steps = 100
  config.progress_bar = False
  return config


def get_grid(length="short"):
  rows = {"short": SHORT, "long": LONG}[length]
  grid = {}
  for name, changes in rows.items():
    config = base_config()
    config.update_from_flattened_dict(changes)
    grid[name] = config
  return grid
