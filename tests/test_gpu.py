"""GPU checks: run with `python -m pytest -m gpu` on a machine with CUDA (skipped elsewhere)."""

import pytest
import torch

from bitcpm_cli.core.device import distributed_backend, resolve_device
from bitcpm_cli.core.quant import LayerQuant, QuantScheme, fake_quantize, fuse, prepare

pytestmark = pytest.mark.gpu


def test_cuda_is_resolved_explicitly_and_by_auto():
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("auto").type == "cuda"
    assert distributed_backend(resolve_device("cuda:0")) == "nccl"


def test_fake_quantize_on_cuda_equals_cpu():
    torch.manual_seed(0)
    w = torch.randn(256, 512, dtype=torch.bfloat16)
    spec = LayerQuant("ternary", 128)
    assert torch.equal(fake_quantize(w.cuda(), spec).cpu(), fake_quantize(w, spec))


def test_fused_logits_equal_qat_logits_on_cuda(tiny_llama):
    model = tiny_llama.to("cuda")
    prepare(model, QuantScheme(group_size=32))
    ids = torch.tensor([[1, 2, 3, 4, 5]], device="cuda")
    with torch.no_grad():
        qat = model(ids).logits
        fuse(model)
        assert torch.equal(model(ids).logits, qat)
