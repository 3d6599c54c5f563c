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


def test_infer_on_cuda_agrees_with_cpu_token_for_token(invoke, tmp_path):
    import json

    from tests.helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "fused")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, how are you?\nThe capital of France is\n")
    for device in ("cuda", "cpu"):
        result = invoke("infer", "--model", model, "--prompts", prompts, "--output", tmp_path / f"{device}.json",
                        "--device", device, "--max-new-tokens", "16", "--logprobs", "2")
        assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cuda.json").read_text())["runtime"]["device"].startswith("cuda")
    compared = invoke("compare", tmp_path / "cuda.json", tmp_path / "cpu.json", "--allow-near-ties", "--json")
    assert compared.exit_code == 0 and json.loads(compared.stdout)["ok"] is True, compared.output


def test_training_on_cuda_is_planned_against_its_memory_and_runs(tmp_path):
    import math

    from bitcpm_cli.core.memory_plan import plan_memory
    from bitcpm_cli.core.train import train
    from tests.integration.test_train import config_for, counting_corpus, losses
    from tests.helpers import build_tiny_model

    build_tiny_model(tmp_path / "float", kind="float")
    counting_corpus(tmp_path / "count.txt")
    config = config_for(tmp_path, tmp_path / "run", "device=cuda", "max_steps=4")
    plan = plan_memory(tmp_path / "float", config, "single", 1, torch.device("cuda", 0))
    assert (plan.available, plan.available_from) == (torch.cuda.get_device_properties(0).total_memory, "cuda:0 memory")
    assert train(config).steps == 4
    assert all(math.isfinite(loss) for loss in losses(tmp_path / "run"))
