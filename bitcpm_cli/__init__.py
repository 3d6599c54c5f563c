"""bitcpm: toolchain for ternary (1.58-bit) LLMs of the BitCPM-CANN family."""

__version__ = "0.1.0"

# The Python API: the functions the commands call, importable from the package (`from bitcpm_cli import ...`).
# Resolved on first use, so `import bitcpm_cli` (and `bitcpm --help`) stays instant and does not load torch.
_API = {
    "collect_environment": "bitcpm_cli.core.device",  # bitcpm env
    "check_config": "bitcpm_cli.core.config_check",  # bitcpm fix-config
    "write_fixed_config": "bitcpm_cli.core.config_check",
    "convert_checkpoint": "bitcpm_cli.core.convert",  # bitcpm convert (fused, packed)
    "export_gguf": "bitcpm_cli.core.gguf_export",  # bitcpm convert --format gguf
    "make_inference_ready": "bitcpm_cli.core.inference_ready",
    "generate": "bitcpm_cli.core.engines",  # bitcpm infer: any engine (a folder: transformers, a .gguf: llama.cpp)
    "engine_for": "bitcpm_cli.core.engines",
    "read_prompts": "bitcpm_cli.core.generate",
    "load_for_inference": "bitcpm_cli.core.generate",
    "run_generation": "bitcpm_cli.core.generate",
    "write_json": "bitcpm_cli.core.generate",
    "compare_results": "bitcpm_cli.core.compare",  # bitcpm compare
    "plan_eval": "bitcpm_cli.core.evaluation",  # bitcpm eval
    "run_eval": "bitcpm_cli.core.evaluation",
    "check_gates": "bitcpm_cli.core.evaluation",
    "TrainConfig": "bitcpm_cli.core.recipe",  # bitcpm train
    "resolve_config": "bitcpm_cli.core.recipe",
    "train": "bitcpm_cli.core.train",
    "SftConfig": "bitcpm_cli.core.sft",  # bitcpm sft
    "fine_tune": "bitcpm_cli.core.sft",
    "read_chat_data": "bitcpm_cli.core.chatdata",
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
