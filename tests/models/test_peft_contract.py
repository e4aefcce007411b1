"""What lorax/models/adapters.py relies on in peft, pinned: its fast path replaces ``LoraLinear.forward`` and reads
the layer's attributes directly, so a peft release that renames or reshapes them must fail here, loudly, before it
can change a result. Also: the installed peft is inside pyproject's bounds, and routing is scoped."""

from __future__ import annotations

import inspect
import re
import tomllib

import peft
import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from lorax.config import AdapterConfig
from lorax.models.adapters import LoraAdapterSet, Route
from tests.helpers import REPO

R, ALPHA = 4, 2.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_installed_peft_is_inside_the_declared_bounds() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"peft\b", d)]
    bounds = SpecifierSet(spec[len("peft"):])
    assert any(s.operator == "<" for s in bounds), "peft needs an upper bound in pyproject.toml"
    assert Version(peft.__version__) in bounds, f"peft {peft.__version__} is outside {bounds}: run this test on it first"


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_lora_layer_attributes_the_fast_path_reads() -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import Linear as LoraLinear

    assert {"adapter_name"} <= set(inspect.signature(inject_adapter_in_model).parameters)
    model = _model()
    for name in ("x", "y"):
        inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.25, bias="none",
                                           target_modules=["0", "2"]), model, adapter_name=name)
    layer = model[0]
    assert isinstance(layer, LoraLinear)
    assert isinstance(layer.base_layer, nn.Linear) and layer.base_layer.in_features == 6
    for attr in ("lora_A", "lora_B", "lora_dropout"):
        assert isinstance(getattr(layer, attr), nn.ModuleDict), attr
        assert set(getattr(layer, attr)) == {"x", "y"}, attr
    assert isinstance(layer.lora_A["x"], nn.Linear) and tuple(layer.lora_A["x"].weight.shape) == (R, 6)
    assert isinstance(layer.lora_B["x"], nn.Linear) and tuple(layer.lora_B["x"].weight.shape) == (5, R)
    assert torch.count_nonzero(layer.lora_B["x"].weight) == 0  # peft's init: B = 0, the adapter starts as identity
    assert isinstance(layer.scaling, dict) and layer.scaling["x"] == pytest.approx(ALPHA / R)
    assert layer.lora_dropout["x"].p == 0.25  # read as ``.p`` (an nn.Dropout)
    layer.forward = lambda x: x  # an instance may replace its forward (the routed one is set this way)
    assert model[0](torch.ones(1, 6)).shape == (1, 6)


def test_routed_layers_equal_peft_own_forward_for_one_adapter() -> None:
    """The routed single-adapter forward is peft's forward with that adapter active."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(1)
    ref = _model()
    mine = _model()
    inject_adapter_in_model(LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=["0", "2"]),
                            ref, adapter_name="x")
    adapters = LoraAdapterSet(mine, AdapterConfig(target_modules="0|2", r=R, alpha=ALPHA, dropout=0.0))
    adapters.add("x")
    with torch.no_grad():
        for (_, a), (_, b) in zip(ref.named_parameters(), mine.named_parameters(), strict=True):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
    x = torch.randn(3, 6)
    with adapters.route.using("x"):
        torch.testing.assert_close(mine(x), ref(x))
    assert not torch.allclose(mine(x), ref(x))  # routing off: the frozen model alone


def test_routing_is_scoped_and_restored_on_errors() -> None:
    route = Route()
    with route.using("a"):
        assert (route.mode, route.name) == ("single", "a")
        with route.using(names=["a", "b"]):
            assert (route.mode, route.names) == ("grouped", ["a", "b"])
        assert (route.mode, route.name) == ("single", "a")
    with pytest.raises(RuntimeError), route.using(names=["a"]):
        raise RuntimeError("a failing forward")
    assert (route.mode, route.name, route.names) == ("off", None, [])
    with pytest.raises(ValueError):
        with route.using():
            pass
