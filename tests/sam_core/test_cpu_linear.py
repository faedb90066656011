"""cpu_linear.linear computes F.linear (+ exact GELU) whichever library it picks, and keeps the
cases it must not take (gradients, autocast dtypes) right."""
import pytest
import torch
import torch.nn.functional as F

from sam_core.modeling import cpu_linear
from sam_core.timing import best_times, fastest


@pytest.fixture(params=[True, False], ids=["onednn", "aten"])
def library(request, monkeypatch):
    """Both branches, whichever this machine prefers."""
    if request.param and not cpu_linear._onednn_linear_available():
        pytest.skip("this PyTorch build cannot run oneDNN linears")
    monkeypatch.setattr(cpu_linear, "prefers_onednn", lambda dtype, threads: request.param)
    return request.param


@torch.no_grad()
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear(library, gelu, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 24, generator=generator)
    weight, bias = torch.randn(40, 24, generator=generator), torch.randn(40, generator=generator)
    bias = bias if with_bias else None
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected) if gelu else expected
    got = cpu_linear.linear(x, weight, bias, gelu=gelu)
    assert got.shape == (3, 50, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_autocast_computes_in_bfloat16(library):
    x, weight, bias = torch.randn(64, 32), torch.randn(16, 32), torch.randn(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(x, weight, bias)
        got = cpu_linear.linear(x, weight, bias, gelu=True)
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.gelu(expected.float()), rtol=0.02, atol=0.05)


def test_gradients_take_f_linear(monkeypatch):
    monkeypatch.setattr(cpu_linear, "prefers_onednn", lambda dtype, threads: True)
    weight = torch.randn(8, 4, requires_grad=True)
    out = cpu_linear.linear(torch.randn(5, 4), weight, None, gelu=True)
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_the_choice_follows_the_timing(monkeypatch):
    winners = iter(["onednn", "aten"])
    monkeypatch.setattr(cpu_linear, "fastest", lambda candidates: next(winners))
    monkeypatch.setattr(cpu_linear, "_onednn_linear_available", lambda: True)
    cpu_linear.prefers_onednn.cache_clear()
    try:
        assert cpu_linear.prefers_onednn(torch.float32, 1) is True
        assert cpu_linear.prefers_onednn(torch.float32, 1) is True  # measured once, then cached
        assert cpu_linear.prefers_onednn(torch.float32, 2) is False  # another thread count: measured again
    finally:
        cpu_linear.prefers_onednn.cache_clear()


def test_fastest_picks_the_quicker_candidate():
    import time

    calls = {"slow": 0, "quick": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    def quick():
        calls["quick"] += 1

    assert fastest({"slow": slow, "quick": quick}, rounds=2) == "quick"
    assert calls == {"slow": 3, "quick": 3}  # one warm-up call, then one per round
    times = best_times({"slow": slow}, rounds=1)
    assert times["slow"] >= 0.02
