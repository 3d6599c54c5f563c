"""Every shipped YAML/JSON in configs/ loads and validates."""

from pathlib import Path

import pytest

from bitcpm_cli.core.quant import QuantScheme, load_scheme_file

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_configs_exist():
    assert ALL_FILES, "configs/ holds no YAML or JSON"


@pytest.mark.parametrize("path", [p for p in ALL_FILES if p.parent.name == "quant"], ids=lambda p: p.name)
def test_quant_schemes_load(path):
    scheme = load_scheme_file(path)
    assert isinstance(scheme, QuantScheme)
    assert scheme.for_module("lm_head").quant_type == "none"


def test_every_config_is_covered():
    covered = {p for p in ALL_FILES if p.parent.name == "quant"}
    assert covered == set(ALL_FILES), f"add a loader test for {sorted(set(ALL_FILES) - covered)}"
