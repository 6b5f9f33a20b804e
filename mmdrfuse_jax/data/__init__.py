"""Training data: TFDS builders for the fusion datasets and the patch pipeline.

- `catalog`: the datasets the builder knows (configs msrs, llvip, roadscene, tno, m3fd,
  harvard_mri_pet, harvard_mri_spect, harvard_mri_ct, paired_folders): their folder layouts
  and where to get them.
- `sources`: the user's dataset folder: its pairs found, checked, read and recorded
  (`DataError` when it cannot be used).
- `builders`: the `fusion_pairs` TFDS builder, ArrayRecord files, no TensorFlow.
- `prepare`: `prepare.prepare(...)` builds idempotently (bin/prepare_data.py).
- `pipeline`: `PatchDataset` (from_tfds / from_arrays / from_synthetic) with stable dense
  patch ids, per-epoch seeded shuffles and resumable `iterate(...)`.
- `synthetic`: procedural infrared/visible pairs (`make_pairs`).

Typical training use:

  ds = pipeline.PatchDataset.from_tfds(data_dir, "msrs", "train")   # or from_synthetic(...)
  memory = np.zeros((ds.num_patches, 128, 128, 1), np.float32)       # indexed by patch_id
  for batch, data_state in ds.iterate(30, seed=0, start_state=saved, num_epochs=30, sharding=mesh):
    ...  # save data_state with the checkpoint to resume exactly here
"""
