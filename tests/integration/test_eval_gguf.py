"""`bitcpm eval` with the llama.cpp engine: a GGUF file scores the same token ids as its transformers source."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="GGUF tests need the gguf extra: pip install -e '.[gguf]'")
pytest.importorskip("llama_cpp", reason="llama.cpp tests need llama-cpp-python (the gguf extra)")

from bitcpm_cli.core.conversion.convert import convert_checkpoint
from bitcpm_cli.core.conversion.gguf.export import export_gguf
from tests.helpers import build_tiny_model  # noqa: E402
from tests.integration.test_gguf import TOKENIZER, qat_model  # noqa: E402


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-gguf")
    qat_model(root / "qat", group_size=-1)
    convert_checkpoint(root / "qat", root / "fused", dtype="float32")
    export_gguf(root / "qat", root / "m.gguf")
    lines = (TOKENIZER.parent / "corpus.txt").read_text().splitlines()[:40]
    (root / "t.txt").write_text("\n".join(lines) + "\n")
    return root


def test_gguf_vs_fused_on_the_same_ids(gguf_models, invoke, tmp_path):
    root = gguf_models
    harness = importlib.util.find_spec("lm_eval") is not None
    tasks = ["--tasks", "bitcpm_counting", "--include-path", Path(__file__).resolve().parents[2] / "configs" / "eval"]
    result = invoke("eval", "-m", root / "fused", "-m", root / "m.gguf", "-m", root / "qat", "--data", root / "t.txt",
                    "--context", "128", "--stride", "64", "-o", tmp_path / "r.json", "--device", "cpu",
                    *(tasks if harness else []))
    assert result.exit_code == 0, result.output
    fused, gguf, qat = json.loads((tmp_path / "r.json").read_text())["models"]
    if harness:  # the harness drives transformers models; a GGUF file gets a note, not a silent gap
        assert "acc" in fused["tasks"]["bitcpm_counting"] and gguf["tasks"] is None
        assert "tasks not run" in gguf["notes"][-1] and "n/a" in result.output
    assert (gguf["engine"], gguf["format"], gguf["dtype"]) == ("llama.cpp", "gguf", "tq2_0")
    assert gguf["tokens"] == fused["tokens"] > 400
    versus = gguf["vs_reference"]  # llama.cpp quantizes activations to 8 bits: close, not identical
    assert 0 < versus["mean_kld"] < 0.01 and versus["same_top_pct"] >= 95
    assert qat["vs_reference"]["mean_kld"] == 0 and qat["vs_reference"]["same_top_pct"] == 100


def test_a_gguf_with_another_vocabulary_is_refused(gguf_models, invoke, tmp_path):
    build_tiny_model(tmp_path / "char", kind="fused")
    result = invoke("eval", "-m", tmp_path / "char", "-m", gguf_models / "m.gguf", "--data", gguf_models / "t.txt",
                    "--context", "64", "-o", tmp_path / "r.json")
    assert result.exit_code == 2 and "another vocabulary" in result.stderr and "token 6 is" in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_infer_picks_the_llamacpp_engine_for_a_gguf_file(gguf_models, invoke, tmp_path):
    result = invoke("infer", "-m", gguf_models / "m.gguf", "-p", "23 24 25", "-o", tmp_path / "r.json", "-q",
                    "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["runtime"]["engine"] == "llama.cpp"
