"""Time `fix-config`'s check on an 8B-shaped checkpoint against a tiny one, in one run.

The 8B checkpoint is real safetensors headers followed by holes (sparse files of full size, ~16 GB on paper,
almost nothing on disk), so the figure shows that the check reads headers only: its time must not grow with the
data. Prints the median wall time of each and their ratio.

    python scripts/bench_fix_config.py
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bitcpm_cli.core.model.config_check import check_config
from tests.helpers import llama_shapes, write_model_dir  # noqa: E402

EIGHT_B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=96)


def config_for(dims: dict) -> dict:
    return {"model_type": "llama", "hidden_size": dims["hidden"], "num_hidden_layers": dims["layers"],
            "num_attention_heads": dims["heads"], "num_key_value_heads": dims["kv_heads"],
            "head_dim": dims["head_dim"], "intermediate_size": dims["intermediate"], "vocab_size": dims["vocab"],
            "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def timed(model: Path, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        report = check_config(model)
        times.append(time.perf_counter() - start)
        assert report.consistent
    return statistics.median(times)


def timed_cli(model: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bitcpm_cli", "fix-config", str(model), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        big = write_model_dir(Path(tmp) / "8b", config_for(EIGHT_B), llama_shapes(**EIGHT_B), shards=4)
        tiny = write_model_dir(Path(tmp) / "tiny", config_for(TINY), llama_shapes(**TINY))
        size = sum(p.stat().st_size for p in big.glob("*.safetensors"))
        params = check_config(big).parameters
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t_big, t_tiny = timed(big), timed(tiny)
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cli_big, cli_tiny = timed_cli(big), timed_cli(tiny)
    print(f"8B-shaped checkpoint: {params / 1e9:.2f}B parameters, {size / 2**30:.1f} GiB in 4 shards (sparse)")
    print(f"check 8B:   {t_big * 1000:8.2f} ms (median of 7; target: well under 1 s)")
    print(f"check tiny: {t_tiny * 1000:8.2f} ms (median of 7)")
    print(f"ratio 8B / tiny: {t_big / t_tiny:.2f}x; peak RSS growth during the checks: "
          f"{(rss_after - rss_before) / 1024:.1f} MiB")
    print(f"whole command `bitcpm fix-config DIR --json`: 8B {cli_big:.2f} s, tiny {cli_tiny:.2f} s "
          f"(ratio {cli_big / cli_tiny:.2f}x; mostly interpreter start-up)")


if __name__ == "__main__":
    main()
