"""Lung segmentation inference: post-processing, side labels, volumes, and the study-level path."""

import keras
import numpy as np
import pytest
from scipy import ndimage

from radlogics_repro import io
from radlogics_repro import lung_segmentation as ls


def _two_lungs(shape=(6, 40, 40)):
    mask = np.zeros(shape, bool)
    mask[1:5, 10:30, 4:16] = True    # patient's right (low x)
    mask[1:5, 10:30, 24:36] = True   # patient's left
    return mask


def test_keep_lung_components_drops_small_debris():
    mask = _two_lungs()
    mask[0, 0, 0] = True                 # a speck
    kept = ls.keep_lung_components(mask)
    assert not kept[0, 0, 0]
    assert kept.sum() == _two_lungs().sum()
    # a second component below 5 % of the largest is not a lung
    one = np.zeros((4, 30, 30), bool)
    one[:, :20, :20] = True
    one[1, 25:27, 25:27] = True
    assert ls.keep_lung_components(one).sum() == 4 * 400
    assert not ls.keep_lung_components(np.zeros((2, 3, 3), bool)).any()


def test_keep_lung_components_with_more_labels_than_uint16_holds():
    """Past 65,535 components the labels fall back to int32: the same two lungs are kept."""
    mask = np.zeros((3, 560, 560), bool)
    mask[1, ::2, ::2] = True                # 78,400 single-voxel specks
    mask[:, 101:301, 101:301] = True        # the largest
    mask[:, 401:451, 401:451] = True        # the second, 6 % of the largest
    labels, n = ls._label_components(mask)
    assert n > 65535 and labels.dtype == np.int32
    kept = ls.keep_lung_components(mask)
    lungs = np.zeros_like(mask)
    lungs[:, 101:301, 101:301] = lungs[:, 401:451, 401:451] = True
    specks_touching = mask & ~lungs & ndimage.binary_dilation(lungs)
    np.testing.assert_array_equal(kept, lungs | specks_touching)
    assert ls._label_components(_two_lungs())[0].dtype == np.uint16


def test_fill_holes_per_slice():
    mask = _two_lungs()
    mask[2, 15:18, 8:11] = False  # a vessel hole
    filled = ls.fill_holes_per_slice(mask)
    assert filled[2, 15:18, 8:11].all()


def test_right_left_labels_from_components_and_from_one_blob():
    labels = ls.label_right_left(_two_lungs())
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[:, :, :20] != 2).all() and (labels[:, :, 20:] != 1).all()
    joined = _two_lungs()
    joined[1:5, 15:20, 16:24] = True  # lungs touching: one component, split per slice
    labels = ls.label_right_left(joined)
    assert (labels[:, :, 4:16][joined[:, :, 4:16]] == ls.RIGHT_LUNG).all()
    assert (labels[:, :, 24:36][joined[:, :, 24:36]] == ls.LEFT_LUNG).all()


def test_lung_volumes_hand_computed():
    labels = np.zeros((2, 10, 10), np.uint8)
    labels[:, :5, :5] = 1   # 50 voxels
    labels[:, :2, 5:] = 2   # 20 voxels
    volumes = ls.lung_volumes_ml(labels, (2.0, 0.5, 0.5))  # 0.5 mm^3 per voxel
    assert volumes == {"total": pytest.approx(0.035), "right": pytest.approx(0.025),
                       "left": pytest.approx(0.01)}


class ThresholdStandIn(keras.Model):
    """A stand-in U-Net: "lung" where the [0, 1] input is below 0.55 (HU < -450, half-way between
    the test's lung and tissue values, so edges neither grow nor shrink)."""

    def call(self, x, training=False):
        return keras.ops.cast(x[..., :1] < 0.55, "float32")


def test_segment_lungs_returns_the_study_grid():
    hu = np.full((6, 40, 40), 40.0, np.float32)
    hu[_two_lungs()] = -850.0
    study = io.study_from_array(hu, (2.0, 0.8, 0.8))
    model = ThresholdStandIn()
    model.build((None, 32, 32, 3))
    mask = ls.segment_lungs(study, model, batch_size=4, label_sides=True, input_size=32)
    assert mask.shape == hu.shape and mask.dtype == np.uint8
    truth = ls.label_right_left(_two_lungs())
    agreement = (mask == truth).mean()
    assert agreement > 0.98


def test_prefilter_keeps_every_lung_slice_and_skips_slices_without_lung():
    from radlogics_repro import synth

    case = synth.generate_case(5, label=1, in_plane=128, n_slices=60)
    has_lung = case.lung_mask.reshape(case.lung_mask.shape[0], -1).any(axis=1)
    candidates = ls.slices_that_may_contain_lung(case.hu, case.spacing)
    assert candidates[has_lung].all()            # never drops a slice with lung
    assert (~has_lung).any() and not candidates.all()  # and the phantom has some to skip


def test_prefilter_on_hand_made_slices():
    spacing = (5.0, 1.0, 1.0)
    hu = np.full((3, 64, 64), -1000.0, np.float32)   # outside air
    hu[:, 8:56, 8:56] = 40.0                         # a body of soft tissue ...
    hu[1, 20:40, 20:40] = -850.0                     # ... with lung in slice 1 (400 mm^2)
    hu[2, 20:40, 0:30] = -850.0                      # slice 2: lung-like air open to the outside
    hu[:, 58:62, 4:60] = -850.0                      # table foam under the body, every slice
    found = ls.slices_that_may_contain_lung(hu, spacing, margin_slices=0)
    assert found.tolist() == [False, True, False]
    assert ls.slices_that_may_contain_lung(hu, spacing, margin_slices=1).tolist() == [True, True, True]
    no_body = np.full((3, 64, 64), -1000.0, np.float32)
    assert ls.slices_that_may_contain_lung(no_body, spacing).all()  # nothing found: run them all


def test_skipped_slices_get_no_lung_and_cost_no_forward_pass():
    calls = []

    class CountingModel:
        """Answers "all lung" and counts the slices it is given (the U-Net's predict_on_batch)."""

        def predict_on_batch(self, batch):
            calls.append(int(batch.shape[0]))
            return np.ones((batch.shape[0], 32, 32, 1), np.float32)

    model = CountingModel()

    hu = np.full((10, 32, 32), 40.0, np.float32)
    run = np.zeros(10, bool)
    run[3:6] = True
    mask = ls.predict_lung_mask(hu, model, batch_size=2, input_size=32, slices=run)
    assert sum(calls) == 3
    assert mask[3:6].all() and not mask[:3].any() and not mask[6:].any()


def test_slice_step_runs_the_network_on_every_kth_slice_and_interpolates_between():
    calls = []

    class WindowEcho:
        """Answers with the windowed input itself as the lung probability, and counts slices."""

        def predict_on_batch(self, batch):
            calls.append(int(batch.shape[0]))
            return np.asarray(batch)[..., :1]

    # slice z is uniform at -1000 + 100 z HU: windowed 0.1 z, so lung (>= 0.5) from z = 5 on
    hu = np.repeat((-1000.0 + 100.0 * np.arange(9, dtype=np.float32))[:, None, None], 16, axis=1)
    hu = np.repeat(hu, 16, axis=2)
    every = ls.predict_lung_mask(hu, WindowEcho(), batch_size=2, input_size=16)
    assert sum(calls) == 9 and every[5:].all() and not every[:5].any()
    calls.clear()
    stepped = ls.predict_lung_mask(hu, WindowEcho(), batch_size=2, input_size=16, slice_step=4)
    assert sum(calls) == 3  # slices 0, 4 and 8; linear in z, so the interpolation is exact
    np.testing.assert_array_equal(stepped, every)
    hu[2] = 0.0  # windowed 1.0, but slice 2 does not run: it gets (0.0 + 0.4) / 2 = 0.2
    assert not ls.predict_lung_mask(hu, WindowEcho(), input_size=16, slice_step=4)[2].any()
    assert ls.predict_lung_mask(hu, WindowEcho(), input_size=16, slice_step=1)[2].all()

    np.testing.assert_array_equal(ls.slices_to_run(np.r_[3:10, 20:22], 3), [3, 6, 9, 20, 21])
    run = np.array([3, 6, 9, 20, 21])
    probs = run[:, None, None].astype(np.float32) * np.ones((1, 2, 2), np.float32)
    np.testing.assert_allclose(ls.interpolate_between(probs, run, np.r_[3:10, 20:22])[:, 0, 0],
                               [3, 4, 5, 6, 7, 8, 9, 20, 21])
    assert [ls.slice_step_for(dz, 2.5) for dz in (0.625, 1.19, 1.25, 2.5, 5.0)] == [4, 2, 2, 1, 1]
    assert ls.slice_step_for(1.0, None) == 1
