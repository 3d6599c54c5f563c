"""Shared fixtures: tiny models built locally, a stand-in torch_npu, the CLI runner."""

from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

from bitcpm_cli.cli.app import app


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_npu = pytest.mark.skip(reason="needs a real Ascend NPU with torch_npu")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "npu" in item.keywords:
            item.add_marker(skip_npu)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def invoke(runner):
    def _invoke(*args: str, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return _invoke


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                  tie_word_embeddings=False)
    values.update(overrides)
    return LlamaConfig(**values)


@pytest.fixture
def cpu_machine(monkeypatch):
    """No CUDA device, also where the tests run on a GPU machine (where `auto` picks CUDA)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama in float32 with fixed random weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


class FakeNpuApi(types.ModuleType):
    """Stand-in for torch.npu with the behaviour the Ascend pitfalls show."""

    def __init__(self):
        super().__init__("torch.npu")
        self.configure(available=False, count=0)

    def configure(self, available: bool, count: int) -> None:
        self._available, self._count = available, count

    def is_available(self) -> bool:
        return self._available

    def device_count(self) -> int:
        return self._count

    def get_device_name(self, index: int) -> str:
        return "Ascend910B2"

    def get_device_properties(self, index: int):
        return types.SimpleNamespace(name="Ascend910B2", total_memory=64 * 2**30)

    # torch.manual_seed seeds every registered backend through these
    def _is_in_bad_fork(self) -> bool:
        return False

    def manual_seed_all(self, seed: int) -> None:
        pass


_NPU_API: FakeNpuApi | None = None


def _npu_api() -> FakeNpuApi:
    """Registered once per process: renaming torch's PrivateUse1 backend to 'npu' cannot be undone, and torch then
    expects a torch.npu module to exist (optimizers query it)."""
    global _NPU_API
    if _NPU_API is None:
        torch.utils.rename_privateuse1_backend("npu")
        _NPU_API = FakeNpuApi()
        torch._register_device_module("npu", _NPU_API)
    return _NPU_API


@pytest.fixture
def fake_npu(monkeypatch):
    """Install a stand-in torch_npu; returns a function to configure it."""

    def install(available: bool = True, count: int = 2, version: str | None = None):
        api = _npu_api()
        api.configure(available, count)
        module = types.ModuleType("torch_npu")
        module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        module.npu = api
        module.version = types.SimpleNamespace(__version__=version or torch.__version__.split("+")[0])
        monkeypatch.setitem(sys.modules, "torch_npu", module)
        return api

    monkeypatch.delenv("ASCEND_RT_VISIBLE_DEVICES", raising=False)
    yield install
    if _NPU_API is not None:
        _NPU_API.configure(False, 0)
