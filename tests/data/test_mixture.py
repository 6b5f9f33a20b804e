"""PatchMixture: ids over the sources, each source's share of an epoch, resumable orders."""

import numpy as np
import pytest

from mmdrfuse_jax.data import pipeline


def _dataset(num_pairs, size, seed):
  return pipeline.PatchDataset.from_synthetic(num_pairs, size, size, seed=seed, patch_size=16,
                                              patch_stride=16)


@pytest.fixture(scope="module")
def sources():
  # 2 pairs of 4x4 patches (32 patches) and 3 pairs of 2x2 (12 patches).
  return _dataset(2, 64, 0), _dataset(3, 32, 1)


def test_ids_and_pixels_follow_the_sources(sources):
  small_first = pipeline.PatchMixture(sources, names=("a", "b"))
  assert small_first.num_patches == 44 and small_first.num_images == 5
  assert small_first.stems[:2] == ["a-" + s for s in sources[0].stems]
  assert small_first.stems[2:] == ["b-" + s for s in sources[1].stems]
  np.testing.assert_array_equal(small_first.source_of_patches(), [0] * 32 + [1] * 12)
  # Patch 32 is the second source's patch 0, pixel for pixel.
  got, want = small_first.patches(np.array([32, 5])), sources[1].patches(np.array([0]))
  np.testing.assert_array_equal(got["ir"][0], want["ir"][0])
  np.testing.assert_array_equal(got["vis"][1], sources[0].patches(np.array([5]))["vis"][0])


def test_unweighted_is_a_permutation(sources):
  mix = pipeline.PatchMixture(sources)
  np.testing.assert_array_equal(np.sort(mix.epoch_order(0, 3)), np.arange(44))


@pytest.mark.parametrize("weights", [(1, 1), (1, 3), (3, 1), (1, 0)])
def test_weighted_epochs_give_each_source_its_share(sources, weights):
  mix = pipeline.PatchMixture(sources, weights)
  share = np.asarray(weights) / sum(weights)
  quotas = mix.epoch_quotas()
  assert quotas.sum() == 44 and np.all(np.abs(quotas - share * 44) < 1)
  for epoch in range(3):
    order = mix.epoch_order(7, epoch)
    assert len(order) == 44
    counts = np.bincount(mix.source_of_patches()[order], minlength=2)
    np.testing.assert_array_equal(counts, quotas)
    for d, ids in enumerate((np.arange(32), np.arange(32, 44))):
      # Every patch of a source comes before any comes twice.
      seen = np.bincount(order[np.isin(order, ids)] - ids[0], minlength=len(ids))
      assert seen.max() - seen.min() <= 1, (d, seen)
    np.testing.assert_array_equal(order, mix.epoch_order(7, epoch))  # Resumable.
  assert not np.array_equal(mix.epoch_order(7, 0), mix.epoch_order(7, 1))


def test_weighted_batches_over_many_epochs(sources):
  """The share holds for the batches a run sees, not only for the orders."""
  mix = pipeline.PatchMixture(sources, (1, 1))
  seen = np.concatenate([b["patch_id"] for b, _ in mix.iterate(4, seed=1, num_epochs=5)])
  share = np.mean(mix.source_of_patches()[seen] == 1)
  assert abs(share - 0.5) < 0.03


def test_held_out_images_never_come(sources):
  a, b = _dataset(2, 64, 0), _dataset(3, 32, 1)
  b.exclude_images([1])
  mix = pipeline.PatchMixture((a, b), (1, 1))
  order = np.concatenate([mix.epoch_order(0, e) for e in range(4)])
  assert 3 not in set(mix.patch_image[order].tolist())  # b's image 1 is the mixture's image 3.
  assert set(mix.patch_image[order].tolist()) == {0, 1, 2, 4}


def test_bad_mixtures_are_refused(sources):
  with pytest.raises(ValueError, match="at least one"):
    pipeline.PatchMixture([])
  with pytest.raises(ValueError, match="weights"):
    pipeline.PatchMixture(sources, (1,))
  with pytest.raises(ValueError, match="non-negative"):
    pipeline.PatchMixture(sources, (1, -1))
  with pytest.raises(ValueError, match="non-negative"):
    pipeline.PatchMixture(sources, (0, 0))
  with pytest.raises(ValueError, match="patch size"):
    pipeline.PatchMixture((sources[0], pipeline.PatchDataset.from_synthetic(
        1, 32, 32, patch_size=8, patch_stride=8)))


def test_mixture_spec():
  assert pipeline.mixture_spec("roadscene") == (["roadscene"], None)
  assert pipeline.mixture_spec("roadscene, llvip", "1,3") == (["roadscene", "llvip"], [1.0, 3.0])
  for datasets, weights, match in [("a,,b", "", "non-empty"), ("a,a", "", "twice"),
                                   ("a,b", "1", "2 dataset"), ("a,b", "1,x", "numbers")]:
    with pytest.raises(ValueError, match=match):
      pipeline.mixture_spec(datasets, weights)
