"""Memory ledger accounting."""
import pytest
import torch

from pgen_engine.training.memory_ledger import (MemoryLedger, SavedTensorMeter, live_tensor_bytes,
                                                module_param_bytes, optimizer_state_bytes, tensor_bytes)


def test_tensor_bytes_counts_storages_once():
    a = torch.zeros(13, 7)
    b = a[2:5]  # a view: same storage
    c = torch.zeros(5, dtype=torch.float64)
    assert tensor_bytes([a, b, c, None]) == 13 * 7 * 4 + 5 * 8


def test_module_and_optimizer_bytes():
    m = torch.nn.Linear(11, 3)
    assert module_param_bytes(m) == (11 * 3 + 3) * 4
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    assert optimizer_state_bytes(opt) == 0
    m(torch.randn(2, 11)).sum().backward()
    opt.step()
    # exp_avg + exp_avg_sq per parameter (+ tiny step scalars)
    assert optimizer_state_bytes(opt) >= 2 * (11 * 3 + 3) * 4
    assert optimizer_state_bytes(None) == 0


def test_saved_tensor_meter_counts_activations_not_params():
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    x = torch.randn(5, 16)
    with SavedTensorMeter(exclude=list(m.parameters())) as meter:
        y = m(x).sum()
    # saved: x (input of linear 1), tanh output (for tanh backward and linear 2 input)
    assert meter.bytes >= (5 * 16 + 5 * 32) * 4
    assert meter.bytes < 4 * (5 * 16 + 5 * 32) * 4
    y.backward()


def test_ledger_metrics_and_reset():
    led = MemoryLedger("cpu")
    led.begin_step()
    with led.phase("rollout"):
        led.record("rollout", "kv", 100)
        led.record("rollout", "gathered_weights", 50)
        led.record("rollout", "kv", 70)  # max kept
    led.record("update", "activations", 120)
    m = led.metrics()
    assert m["mem/rollout_kv_bytes"] == 100 and m["mem/rollout_gathered_weights_bytes"] == 50
    assert m["mem/total_bytes"] == 150  # the largest phase
    led.begin_step()
    assert led.metrics() == {"mem/total_bytes": 0.0}
    with pytest.raises(ValueError, match="phase"):
        led.record("train", "x", 1)
    with pytest.raises(ValueError, match="negative"):
        led.record("update", "x", -1)


def test_live_tensor_scan_sees_new_tensors():
    base = live_tensor_bytes()
    keep = torch.zeros(1 << 18)  # 1 MiB
    assert live_tensor_bytes() - base >= (1 << 20)
    del keep
    assert live_tensor_bytes() - base < (1 << 20)
    led = MemoryLedger("cpu", scan_every=2)
    led.begin_step()
    assert "mem/live_tensor_bytes" not in led.metrics()
    led.begin_step()
    keep = torch.ones(1000)
    assert led.metrics()["mem/live_tensor_bytes"] >= keep.numel() * 4
