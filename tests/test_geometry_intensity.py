"""World-space resampling (registration.geometry) and input contrast randomisation (data.intensity)."""

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from deepsim.data.intensity import ContrastRandomization, contrast_randomization
from deepsim.geometry import Grid, apply_affine, grid_points, sample_at, working_grid


def _oblique(theta: float, spacing=(1.5, 1.0, 2.0), origin=(-20.0, 10.0, 5.0)) -> np.ndarray:
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([-1.0, -1.0, 1.5, 1.0]), _oblique(0.3)],
                         ids=["RAS", "LPS", "oblique"])
def test_working_grid_covers_the_fixed_image_at_the_model_spacing(affine):
    fixed = Grid((37, 41, 29), affine)
    grid = working_grid(fixed, 1.25, multiple=16)
    assert all(n % 16 == 0 for n in grid.shape)
    assert np.allclose(grid.affine[:3, :3], np.diag([1.25] * 3))  # RAS, axis-aligned, model spacing
    corners = np.array(np.meshgrid([0, 36], [0, 40], [0, 28], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:]
    index = np.linalg.inv(grid.affine[:3, :3]) @ (world - grid.affine[:3, 3:])
    assert index.min() >= -1e-6 and np.all(index.max(axis=1) <= np.array(grid.shape) - 1 + 1e-6)


def test_sample_at_equals_scipy_map_coordinates_at_random_points():
    """Linear and nearest sampling at world points against scipy's voxel-space interpolation (order 1 / 0)."""
    rng = np.random.default_rng(0)
    image = rng.random((12, 14, 10)).astype(np.float32)
    affine = _oblique(-0.2)
    voxel = rng.uniform(0.5, [10.5, 12.5, 8.5], size=(200, 3)).T  # inside: no padding rule involved
    world = torch.as_tensor(affine[:3, :3] @ voxel + affine[:3, 3:])
    ours = sample_at(torch.as_tensor(image), affine, world).numpy()
    assert np.abs(ours - ndi.map_coordinates(image, voxel, order=1)).max() < 1e-5  # measured 3e-7
    labels = rng.choice([0, 7, 1002, 2035], size=image.shape)
    nearest = sample_at(torch.as_tensor(labels), affine, world, mode="nearest").numpy()
    assert np.array_equal(nearest, labels[tuple(np.round(voxel).astype(int))])


def test_sample_at_reads_zero_outside_and_a_known_shift_exactly():
    image = torch.arange(6 * 7 * 5, dtype=torch.float32).reshape(6, 7, 5)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    points = grid_points(Grid((6, 7, 5), affine))
    shifted = sample_at(image, affine, points + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64).view(3, 1, 1, 1))
    assert torch.allclose(shifted[:-1], image[1:], atol=1e-4)  # 2 mm = one voxel along axis 0; measured 7.6e-6
    assert torch.all(shifted[-1] == 0)  # beyond the image: 0, as ITK's Resample with default value 0


def test_apply_affine_in_2d_uses_the_in_plane_block():
    matrix = np.eye(4)
    matrix[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    matrix[:2, 3] = [5.0, 6.0]
    matrix[2, 3] = 100.0  # the z translation must not leak into 2D points
    points = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    assert torch.allclose(apply_affine(matrix, points), torch.tensor([[3.0], [7.0]], dtype=torch.float64))


def test_contrast_randomisation_is_seeded_per_image_and_stays_in_unit_range():
    x = torch.rand(3, 1, 16, 18, 14)
    a, b = ContrastRandomization(generator_seed=3)(x), ContrastRandomization(generator_seed=3)(x)
    assert torch.equal(a, b)  # same seed, same draw
    assert not torch.equal(a, ContrastRandomization(generator_seed=4)(x))
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    assert not torch.allclose(a[0], a[1])  # each image of the batch gets its own contrast
    with pytest.raises(ValueError, match="B, 1"):
        ContrastRandomization()(torch.rand(2, 3, 8, 8, 8))


def test_intensity_curve_and_gamma_alone_keep_the_order_of_intensities():
    """Without bias, blur and noise the map is monotonic: tissue ordering (WM > GM > CSF) is preserved."""
    x = torch.linspace(0, 1, 4096).view(1, 1, 16, 16, 16)
    y = ContrastRandomization(bias_strength=0, blur_sigma_max=0, noise_sd_max=0, generator_seed=1)(x)
    assert torch.all(y.flatten().diff() >= 0)
    assert (y - x).abs().max() > 0.05  # and it does change the contrast


def test_contrast_randomisation_config_switch():
    assert contrast_randomization(False) is None
    assert isinstance(contrast_randomization(True, seed=2), ContrastRandomization)
    out = contrast_randomization(True)(torch.rand(2, 1, 20, 24))  # 2D works too
    assert out.shape == (2, 1, 20, 24)


def test_registration_task_randomises_only_what_the_network_sees():
    """The network gets contrast-randomised inputs; the loss compares the clean images."""
    from deepsim.engine.tasks import RegistrationTask

    seen = {}

    class Net(torch.nn.Module):
        def forward(self, moving, fixed):
            seen["net"] = (moving.clone(), fixed.clone())
            return torch.zeros(1, 3, *fixed.shape[2:])

    def objective(warped, fixed, ddf):
        seen["loss"] = (warped.clone(), fixed.clone())
        return {"loss": torch.tensor(0.0)}

    batch = {"moving": torch.rand(1, 1, 8, 10, 6), "fixed": torch.rand(1, 1, 8, 10, 6)}
    RegistrationTask(objective, input_transform=ContrastRandomization(generator_seed=0))(Net(), batch, "cpu")
    assert torch.equal(seen["loss"][1], batch["fixed"])
    assert torch.allclose(seen["loss"][0], batch["moving"], atol=1e-6)  # warp by a zero field: 1e-7 (float32)
    assert not torch.allclose(seen["net"][1], batch["fixed"], atol=1e-2)


def test_trainer_time_limit_stops_early_and_still_completes():
    """time_limit_s ends training after the limit; COMPLETED handlers (which save the network) still run."""
    import time

    from ignite.engine import Events

    from deepsim.engine.trainer import build_trainer

    def slow_task(network, batch, device):
        time.sleep(0.3)
        return {"loss": network(torch.ones(1, 1)).sum()}

    trainer = build_trainer(torch.nn.Linear(1, 1), slow_task, [{"x": 0}] * 100, max_epochs=1, time_limit_s=1)
    completed = []
    trainer.add_event_handler(Events.COMPLETED, lambda e: completed.append(e.state.iteration))
    trainer.run()
    assert completed and 2 <= completed[0] < 100
