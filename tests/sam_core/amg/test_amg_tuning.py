"""Per-machine choices: the decoder sub-batch follows what was timed, is measured once, and the
bf16 decision follows the bf16/fp32 timing."""
import pytest
import torch

from sam_core.amg import tuning
from tests.sam_core.amg.amg_parity import amg_model_pair


@pytest.fixture(scope="module")
def model():
    return amg_model_pair(seed=1)[1]


@pytest.fixture
def fake_timing(monkeypatch):
    """Replace the stopwatch by a table of seconds per prompt; record what was timed."""
    timed = []

    def install(per_prompt):
        def best_times(candidates, rounds=3):
            timed.append(sorted(candidates))
            return {size: per_prompt[size] * size for size in candidates}

        monkeypatch.setattr(tuning, "best_times", best_times)
        monkeypatch.setattr(tuning, "_measured_batch_sizes", {})
        return timed

    return install


def test_picks_the_fastest_size_per_prompt(model, fake_timing):
    timed = fake_timing({1: 5.0, 2: 3.0, 4: 2.0, 8: 2.5})
    assert tuning.decoder_batch_size(model, torch.device("cpu"), 64) == 4
    assert timed == [[1, 2, 4, 8]]
    assert tuning.decoder_batch_size(model, torch.device("cpu"), 64) == 4
    assert len(timed) == 1  # measured once per process for this decoder, dtype and thread count


def test_keeps_doubling_while_the_largest_is_fastest(model, fake_timing):
    timed = fake_timing({1: 9.0, 2: 8.0, 4: 7.0, 8: 6.0, 16: 5.0, 32: 5.5})
    assert tuning.decoder_batch_size(model, torch.device("cpu"), 64) == 16
    assert timed == [[1, 2, 4, 8], [16], [32]]


def test_never_more_than_requested_and_accelerators_take_it_all(model, fake_timing):
    fake_timing({1: 9.0, 2: 8.0, 4: 7.0, 8: 6.0})
    assert tuning.decoder_batch_size(model, torch.device("cpu"), 3) == 2
    assert tuning.decoder_batch_size(model, torch.device("cuda"), 64) == 64


@torch.no_grad()
def test_measures_the_real_decoder(model, monkeypatch):
    monkeypatch.setattr(tuning, "_measured_batch_sizes", {})
    size = tuning.decoder_batch_size(model, torch.device("cpu"), 64)
    assert size in (1, 2, 4, 8, 16, 32, 64)
    assert list(tuning._measured_batch_sizes.values()) == [size]


def test_bfloat16_follows_the_timing(monkeypatch):
    for bf16_seconds, expected in ((1.0, True), (3.0, False)):
        monkeypatch.setattr(tuning, "best_times", lambda candidates, rounds=3: {"fp32": 2.0, "bf16": bf16_seconds})
        tuning.bfloat16_pays.cache_clear()
        assert tuning.bfloat16_pays("cpu", 1) is expected
    tuning.bfloat16_pays.cache_clear()


def test_fast_generator_reports_its_dtype(model, monkeypatch):
    from sam_core import AutomaticMaskGenerator

    monkeypatch.setattr("sam_core.amg.generator.bfloat16_pays", lambda device, threads: False)
    generator = AutomaticMaskGenerator(model, points_per_side=2, fast=True)
    assert not generator.uses_bfloat16
    assert not AutomaticMaskGenerator(model, points_per_side=2).uses_bfloat16
    monkeypatch.setattr("sam_core.amg.generator.bfloat16_pays", lambda device, threads: True)
    assert generator.uses_bfloat16
