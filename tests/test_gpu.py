"""GPU checks: run with `python -m pytest -m gpu` on a machine with CUDA (skipped elsewhere)."""

import pytest
import torch

from bitcpm_cli.core.runtime.device import distributed_backend, resolve_device
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
    """Through the CLI in a process of its own: a stand-in torch_npu registered by another test (process-wide,
    for good) would make this process's autograd look for an NPU."""
    import math
    import subprocess
    import sys

    from bitcpm_cli.core.training.memory_plan import plan_memory
    from tests.helpers import build_tiny_model
    from tests.integration.test_train import RECIPE, ROOT, config_for, counting_corpus, losses

    build_tiny_model(tmp_path / "float", kind="float")
    counting_corpus(tmp_path / "count.txt")
    plan = plan_memory(tmp_path / "float", config_for(tmp_path, tmp_path / "run", "device=cuda"), "single", 1,
                       torch.device("cuda", 0))
    assert (plan.available, plan.available_from) == (torch.cuda.get_device_properties(0).total_memory, "cuda:0 memory")
    done = subprocess.run([sys.executable, "-m", "bitcpm_cli", "train", "--config", str(RECIPE), "--model",
                           str(tmp_path / "float"), "--data", str(tmp_path / "count.txt"), "--output-dir",
                           str(tmp_path / "run"), "device=cuda", "max_steps=4", "logging_steps=1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "cuda:0 memory" in done.stdout + done.stderr  # the plan printed against the GPU
    assert len(losses(tmp_path / "run")) == 4 and all(math.isfinite(x) for x in losses(tmp_path / "run"))
