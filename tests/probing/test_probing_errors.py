"""Bad input to the probing family: clear MechkitErrors (that are also the builtin a user would
catch), and no hook left on the model after any of them."""

from __future__ import annotations

import pytest
import torch

import mechkit as mk
from mechkit.probing import ConceptEraser, ProbingDataset, fit_probe, interchange
from tests.conftest import hook_count


def test_labels_of_the_wrong_length():
    with pytest.raises(mk.ShapeError, match="one position, label"):
        ProbingDataset(["a", "b"], [0, 0], [1])
    with pytest.raises(mk.ShapeError, match="one label per row"):
        fit_probe(torch.randn(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="one label per row"):
        ConceptEraser.leace(torch.randn(10, 3), torch.arange(8) % 2)


def test_a_single_class():
    x = torch.randn(40, 3)
    with pytest.raises(mk.InvalidArgumentError, match="at least two classes"):
        fit_probe(x, torch.zeros(40, dtype=torch.long))
    with pytest.raises(mk.InvalidArgumentError, match="constant"):
        ConceptEraser.leace(x, torch.zeros(40, dtype=torch.long))


def test_a_dataset_too_small_for_the_folds():
    x = torch.randn(12, 3)
    with pytest.raises(mk.EmptyDatasetError, match="folds"):
        fit_probe(x, torch.arange(12) % 2, folds=10)
    assert isinstance(mk.EmptyDatasetError("x"), ValueError)


def test_a_subspace_larger_than_the_site(toy):
    with pytest.raises(mk.InvalidArgumentError, match=r"k <= 128"):
        mk.das(toy, [[1, 2]] * 4, [[3, 4]] * 4, [5] * 4, hook_name="blocks.0.hook_resid_pre",
               k=129)  # fmt: skip
    with pytest.raises(mk.ShapeError, match=r"basis of shape \(k, 128\)"):
        interchange(toy, [[1, 2]], [[3, 4]], torch.eye(129), hook_name="blocks.0.hook_resid_pre")
    assert hook_count(toy) == 0


def test_das_labels_and_hooks(toy):
    with pytest.raises(mk.ShapeError, match="one counterfactual label per pair"):
        mk.das(toy, [[1, 2]] * 4, [[3, 4]] * 4, [5] * 3, hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(mk.SiteNotFoundError, match="Did you mean"):
        mk.das(toy, [[1, 2]] * 4, [[3, 4]] * 4, [5] * 4, hook_name="blocks.0.hook_resid_pree")
    assert hook_count(toy) == 0


def test_a_position_outside_a_text_leaves_no_hook(toy):
    data = ProbingDataset([(1, 2, 3), (4, 5)], [2, 2], [0, 1])
    with pytest.raises(mk.PromptLengthError, match="position 2"):
        mk.train_probe(toy, data, layers=[0])
    assert hook_count(toy) == 0


def test_bad_choices_and_sites(toy):
    data = ProbingDataset([(1, 2, 3)] * 20, [1] * 20, [i % 2 for i in range(20)])
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'resid_post'"):
        mk.train_probe(toy, data, site="resid_postt")
    with pytest.raises(mk.InvalidSiteError, match="layers in"):
        mk.train_probe(toy, data, layers=[5])
    with pytest.raises(mk.InvalidArgumentError, match="Did you mean 'linear'"):
        fit_probe(torch.randn(20, 3), torch.arange(20) % 2, kind="linearr")
    with pytest.raises(mk.SiteNotFoundError):
        with mk.erase(toy, ConceptEraser.random(128, 1)):
            pass
    assert hook_count(toy) == 0
