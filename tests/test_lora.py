import pytest
import torch
from torch import nn

from cdsam.models.lora import (
    LoRALinear,
    find_targets,
    inject_lora,
    lora_parameters,
    lora_specs,
    merge_lora,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_zero_init_is_identity():
    net = _net()
    x = torch.randn(5, 8)
    before = net(x)
    inject_lora(net, ["0", "2"], rank=2, alpha=4)
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)


def test_merge_is_exact():
    net = _net()
    inject_lora(net, ["0", "2"], rank=3, alpha=6)
    with torch.no_grad():
        for p in lora_parameters(net):
            p.normal_()
    x = torch.randn(7, 8)
    adapted = net(x)
    layer = net[0]
    expected_w = layer.base.weight + (6 / 3) * layer.lora_B @ layer.lora_A
    assert merge_lora(net) == 2
    assert not any(isinstance(m, LoRALinear) for m in net.modules())
    torch.testing.assert_close(net[0].weight, expected_w)
    torch.testing.assert_close(net(x), adapted, rtol=1e-5, atol=1e-5)


def test_only_lora_trainable_inside_wrapped_layer():
    net = _net()
    inject_lora(net, ["0"], rank=2, alpha=2)
    wrapped = net[0]
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def test_params_found_by_type_not_name():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.A = nn.Linear(4, 4)  # a name that a substring search for ".A" would catch
            self.lin = nn.Linear(4, 4)

    m = Odd()
    inject_lora(m, ["lin"], rank=1, alpha=1)
    ids = {id(p) for p in lora_parameters(m)}
    assert ids == {id(m.lin.lora_A), id(m.lin.lora_B)}
    assert [s.name for s in lora_specs(m)] == ["lin"]


def test_find_targets_and_double_injection():
    net = _net()
    assert find_targets(net, ["0"]) == ["0"]
    inject_lora(net, ["0"], 2, 2)
    with pytest.raises(ValueError, match="already"):
        inject_lora(net, ["0"], 2, 2)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), 0, 1)
