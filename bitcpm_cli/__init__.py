"""bitcpm: toolchain for ternary (1.58-bit) LLMs of the BitCPM-CANN family."""

__version__ = "0.1.0"

# The Python API: the functions the commands call, importable from the package (`from bitcpm_cli import ...`).
# Resolved on first use, so `import bitcpm_cli` (and `bitcpm --help`) stays instant and does not load torch.
_API = {
    "collect_environment": "bitcpm_cli.core.runtime.environment",  # bitcpm env
    "check_config": "bitcpm_cli.core.model.config_check",  # bitcpm fix-config
    "write_fixed_config": "bitcpm_cli.core.model.config_check",
    "convert_checkpoint": "bitcpm_cli.core.conversion.convert",  # bitcpm convert (fused, packed)
    "export_gguf": "bitcpm_cli.core.conversion.gguf.export",  # bitcpm convert --format gguf
    "make_inference_ready": "bitcpm_cli.core.model.inference_ready",
    "generate": "bitcpm_cli.core.engines.registry",  # bitcpm infer: any engine (a folder: transformers, a .gguf: llama.cpp)
    "engine_for": "bitcpm_cli.core.engines.registry",
    "read_prompts": "bitcpm_cli.core.engines.prompts",
    "load_for_inference": "bitcpm_cli.core.engines.hf",
    "run_generation": "bitcpm_cli.core.engines.hf",
    "write_json": "bitcpm_cli.core.io.outputs",
    "compare_results": "bitcpm_cli.core.evaluation.compare",  # bitcpm compare
    "plan_eval": "bitcpm_cli.core.evaluation.perplexity",  # bitcpm eval
    "run_eval": "bitcpm_cli.core.evaluation.perplexity",
    "check_gates": "bitcpm_cli.core.evaluation.perplexity",
    "TrainConfig": "bitcpm_cli.core.training.recipe",  # bitcpm train
    "resolve_config": "bitcpm_cli.core.training.recipe",
    "train": "bitcpm_cli.core.training.train",
    "SftConfig": "bitcpm_cli.core.training.sft",  # bitcpm sft
    "fine_tune": "bitcpm_cli.core.training.sft",
    "read_chat_data": "bitcpm_cli.core.training.chatdata",
    "run_quickstart": "bitcpm_cli.core.quickstart",  # bitcpm quickstart
    "BitcpmError": "bitcpm_cli.core.errors",
    "InputError": "bitcpm_cli.core.errors",
    "CheckFailed": "bitcpm_cli.core.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'bitcpm_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
