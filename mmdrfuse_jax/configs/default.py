"""Shared defaults of every training config (the published code's settings).

Other configs start from `get_config(model)` here and override what differs. Any field can be
overridden on the command line: `bin/train.py --config=configs/student.py --config.optim.lr=3e-4`.
Each default is written here only: a run reads every key of its config into its run spec
(`mmdrfuse_jax.train.run_spec.RunSpec.from_config`), which supplies none of its own.
"""

import dataclasses

import ml_collections

from mmdrfuse_jax.train import losses


def get_config(model: str = "student") -> ml_collections.ConfigDict:
  """The published code's settings for `model` ("student" or "teacher")."""
  config = ml_collections.ConfigDict()
  config.model = model
  config.seed = 0  # Initialisation and the data's per-epoch shuffles.

  # Training patches (SPEC section 5): a dataset built by bin/prepare_data.py, or the
  # package's procedural pairs when `synthetic_pairs` > 0.
  config.data = ml_collections.ConfigDict()
  config.data.dataset = ""  # A builder config name, e.g. "llvip", "msrs", "roadscene".
  # Several, comma-separated ("roadscene,llvip"), train on their mixture (data/pipeline.py's
  # `PatchMixture`): `weights` ("1,1") gives each its share of every epoch; empty: in
  # proportion to their patches. Each is held out (`holdout`) and validated on its own pairs.
  config.data.weights = ""
  config.data.data_dir = ""  # The --data_dir given to bin/prepare_data.py.
  config.data.split = "train"
  # A fraction of the split's pairs (by a stable hash of their stems, data/holdout.py) kept
  # out of training, for `validation.split = "holdout"`: choose on it, never on a test set.
  config.data.holdout = 0.0
  # Photometric augmentation of the training patches (data/augment.py): each image its own
  # exposure, gamma and contrast; off in the published recipes.
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.enabled = False
  config.data.augment.exposure = 1.0  # log2 gain spread: from half to twice as bright
  config.data.augment.gamma = 0.5  # log2 gamma spread
  config.data.augment.contrast = 0.3
  # Each patch keeps one draw for the whole run (instead of a new one every epoch): its
  # teacher targets can then be kept in host RAM (teacher_cache), and its refresh memories
  # hold outputs of the inputs it is trained on.
  config.data.augment.per_patch = False
  config.data.patch_size = 128
  config.data.patch_stride = 128
  config.data.synthetic_pairs = 0
  config.data.synthetic_height = 256
  config.data.synthetic_width = 256
  # A built dataset's patches: "off" decodes the split's images into host RAM before the first
  # step; "on" reads each batch's patches from the dataset's files as it is assembled (host
  # RAM: the patch index, not the images; every epoch decodes the images again); "auto" streams
  # splits whose decoded images would exceed 2 GiB (LLVIP's). Same batches either way: it may
  # change between reruns of a run.
  config.data.streaming = "auto"

  config.batch_size = 25
  config.num_epochs = 10

  # Adam with PyTorch's defaults, constant learning rate.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  # "constant" (published) or "cosine" (down to final_lr_fraction * lr at the last step);
  # either after `warmup_steps` rising linearly from 0.
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0
  config.optim.final_lr_fraction = 0.0

  # The student's first convolution's biases at the start (Flax's default is 0; conv2 starts
  # from the teacher's conv00). Above 0, its ReLUs start on for dark patches too.
  config.init = ml_collections.ConfigDict()
  config.init.conv1_bias = 0.0

  # The loss weights (`w_int`, `w_percep`, `w_grad`, `w_distill`, `w_refresh`) of the published
  # code for this model (SPEC section 3). A term with weight 0 is not computed at all.
  config.loss = ml_collections.ConfigDict(dataclasses.asdict(losses.PUBLISHED_WEIGHTS[model]))
  config.loss.gradient_form = "code"  # "code" (published) or "paper" (Eq. 3).
  config.loss.distill_normalize = "batch"  # "batch" (published code) or "sample" (paper Eq. 1).
  # The perception term's features: "vgg" (VGG-19, published) or, for a student, "teacher"
  # (its frozen teacher's first two encoder maps: no download, train/distill.py).
  config.loss.perception = "vgg"
  # Not in the published recipe: `loss.w_alive` (0 above) weighs a term that keeps some conv1
  # unit on by `alive_margin` at every pixel (`losses.alive_loss`): against dead regions.
  config.loss.alive_margin = 0.05

  # Dynamic refresh (SPEC section 4): one switch per memory kind (`refresh.MEMORY_KINDS`).
  config.refresh = ml_collections.ConfigDict()
  config.refresh.ssim = True
  config.refresh.gmsd = True
  config.refresh.per_sample = False  # Published: one decision per batch.
  config.refresh.memory_dtype = "bfloat16"  # "bfloat16", "float32" or "uint8".
  config.refresh.weight_scale = 10.0
  # Where the memories live (same results in each): "replicated" (every slot on every device),
  # "sharded" (the slots split over the devices that split the batch) or "host" (split the
  # same way, in pinned host memory: for sets whose memories exceed device memory). It may
  # change between reruns of a run (see docs/train.md).
  config.refresh.placement = "replicated"

  # How VGG-19 and the teacher compute (mmdrfuse_jax/models/precision.py): "exact" (float32,
  # highest precision: the published numbers), "default" (the backend's default: TF32 on
  # recent NVIDIA GPUs) or "bfloat16" (their activations in bfloat16; losses and optimiser in
  # float32). It may change between reruns of a run.
  config.precision = "exact"

  # Frozen networks. `vgg_weights`: the .npz written by bin/convert_vgg19.py.
  config.vgg_weights = ""
  config.allow_random_vgg = False  # Quickstart only: a seeded random VGG when none is given.
  config.random_vgg_seed = 20241127
  # Student runs: the teacher (the project's own weights or the published teacher.model).
  config.teacher_weights = ""
  # Where a student run gets the frozen teacher's targets: "host" keeps them per patch in host
  # RAM after their first computation (2 x H x W float32 per patch) instead of running the
  # teacher in every step; "off" runs the teacher in every step; "auto" is "host" on a CPU
  # (where the teacher's forward pass is a large part of a step) and "off" on accelerators
  # (where the cache would add a device-to-host read and a host-to-device copy per step).
  # With `data.augment` (unless per_patch) the patches change every epoch, and so do their
  # targets: "auto" is then "off", and "host" is refused.
  config.teacher_cache = "auto"
  # Where the cache also keeps the targets on disk ("": nowhere, RAM for this run only). A
  # resumed run, or another run on the same patches and teacher (the rows of an ablation
  # grid, which share WORKDIR/teacher_targets), then reads them instead of running the teacher
  # again; 131 kB per 128 x 128 patch. Each entry is checked against its patch's inputs.
  config.teacher_cache_dir = ""

  # Rerunning in the same --workdir resumes; a run with other settings (see
  # `run_record.IDENTITY_KEYS` in mmdrfuse_jax/train/) is refused unless `start_fresh`, which
  # moves the earlier run aside (to WORKDIR/replaced-<time>) and starts over. `num_epochs` may
  # grow between reruns.
  config.start_fresh = False

  # Validation during training (mmdrfuse_jax/train/validation.py): held-out pairs fused at full size
  # with the current parameters, as bin/fuse.py would, and scored as bin/evaluate.py would,
  # every `every_steps` steps (0: only at the end) and at the end; means go to TensorBoard and
  # metrics.jsonl as val/<metric>, `num_images` pairs to TensorBoard as images. One source:
  # two folders paired by stem (`ir_dir`, `vis_dir`), a `split` of the run's built dataset
  # (e.g. "test"), or `synthetic_pairs` procedural pairs of the given size (not training pairs).
  # None given: no validation. The first `max_pairs` pairs by stem (0: all) keep it short.
  config.validation = ml_collections.ConfigDict()
  config.validation.ir_dir = ""
  config.validation.vis_dir = ""
  config.validation.split = ""  # A split of the built dataset; "holdout": data.holdout's pairs.
  # With `split`: the built datasets whose pairs are validated on, comma-separated (empty: the
  # run's own). Runs that train on different datasets then validate on the same pairs, say
  # "roadscene,llvip" for a run on RoadScene alone, and their scores compare.
  config.validation.datasets = ""
  config.validation.synthetic_pairs = 0
  config.validation.synthetic_height = 128
  config.validation.synthetic_width = 128
  config.validation.every_steps = 0
  config.validation.max_pairs = 16
  config.validation.metrics = ""  # e.g. "VIF,Qabf,SSIM"; empty: the eleven published metrics.
  config.validation.num_images = 3
  # A metric (e.g. "VIF") by which the best validation's parameters are kept in
  # WORKDIR/best_<metric>/ and WORKDIR/<model>_best_<metric>.npz; empty: not kept.
  config.validation.best_metric = ""

  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.progress_bar = True
  return config
