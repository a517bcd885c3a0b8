"""`ICDConfig.train`: a reverse-only run (a few-step generator with no forward model) and a forward-only run against
its frozen R (docs/flow.md §8) touch only their own adapter."""

import pytest
import torch
from safetensors.torch import load_file

from icd.models import lora
from icd.models.loading import load_model
from icd.train.config import ConfigError
from icd.train.icd import ICDConfig, train_icd
from icd.train.icd_step import loss_terms


def _weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(str(folder / f"{name}.safetensors")) for name in lora.ADAPTERS}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(random_distilled_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_modes")
    common = dict(model=str(random_distilled_dir), batch_size=2, n_images=4, rank=4, checkpoint_every=1, log_every=1)
    model = load_model(random_distilled_dir, unet_subfolder="unet_guidance")
    lora.add_adapters(model.unet, rank=4, alpha=8, seed=0)  # the trainer's initialisation (ICDConfig.seed 0)
    untrained = {name: lora.adapter_state_dict(model.unet, name) for name in lora.ADAPTERS}
    reverse = train_icd(ICDConfig(out_dir=str(root / "reverse"), steps=2, train="reverse", **common))
    forward = train_icd(ICDConfig(out_dir=str(root / "forward"), steps=2, train="forward", init_adapters=str(reverse),
                                  **common))
    return untrained, _weights(reverse), _weights(forward)


def test_a_reverse_run_trains_r_alone_and_a_forward_run_f_alone_against_it(runs):
    untrained, reverse, forward = runs
    assert not _equal(reverse[lora.REVERSE], untrained[lora.REVERSE])
    assert _equal(reverse[lora.FORWARD], untrained[lora.FORWARD])  # F never stepped
    assert _equal(forward[lora.REVERSE], reverse[lora.REVERSE])  # R frozen
    assert not _equal(forward[lora.FORWARD], reverse[lora.FORWARD])


def test_each_mode_computes_only_its_own_terms():
    names = {mode: [adapter for adapter, _, _ in loss_terms(_StubModel(), ICDConfig(train=mode, init_adapters="x"
                                                                                        if mode == "forward" else ""),
                                                            _StubBatch())] for mode in ("both", "reverse", "forward")}
    assert names["both"] == [lora.REVERSE, lora.FORWARD, lora.FORWARD, lora.REVERSE]
    assert names["reverse"] == [lora.REVERSE]  # R-CD only: L_r needs a trained F
    assert names["forward"] == [lora.FORWARD, lora.FORWARD]  # F-CD and L_f


def test_a_forward_run_without_the_reverse_adapters_is_refused():
    with pytest.raises(ConfigError, match="init_adapters"):
        ICDConfig(train="forward")
    with pytest.raises(ConfigError, match="train must be one of"):
        ICDConfig(train="encoder")


class _StubModel:
    """Enough of a model for `loss_terms`, which only builds closures (nothing is computed)."""

    schedule = None

    def eps_fn(self, **kwargs):
        return None


class _StubBatch:
    z0 = cond = boundaries = None
    draws: dict = {}
