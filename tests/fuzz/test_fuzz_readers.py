"""Fuzz every careful reader: whatever the bytes, the result is a value or a BitcpmError (exit 2), never another
exception. Bounded: a few hundred examples each, no deadline (2-core CI machines)."""

import json
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitcpm_cli.core.model.checkpoint import read_safetensors_header
from bitcpm_cli.core.errors import BitcpmError
from bitcpm_cli.core.io.safetensors import check_safetensors_header
from bitcpm_cli.core.io.readers import decode_utf8, parse_json, parse_yaml
from bitcpm_cli.core.formats.results import read_results

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                           max_leaves=20)


@st.composite
def mangled_json(draw):
    """Valid JSON, then maybe cut, spliced with random bytes, deeply nested or given a huge number."""
    text = json.dumps(draw(json_values))
    kind = draw(st.sampled_from(["plain", "cut", "splice", "deep", "huge", "constant"]))
    if kind == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif kind == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=6)) + text[at:]
    elif kind == "deep":
        depth = draw(st.integers(50, 3000))
        text = "[" * depth + text + "]" * depth
    elif kind == "huge":
        text = f'{{"a": {draw(st.sampled_from(["-", ""]))}{"7" * draw(st.integers(30, 6000))}, "b": {text}}}'
    elif kind == "constant":
        text = f'[{draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e999"]))}, {text}]'
    return text


def outcome(call):
    try:
        return call()
    except BitcpmError as exc:
        assert exc.message and exc.hint  # one line and a hint
        return exc


@FAST
@given(st.one_of(mangled_json(), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_json_reader(text):
    value = outcome(lambda: parse_json(text, "fuzz.json"))
    if not isinstance(value, BitcpmError):
        json.dumps(value, allow_nan=False)  # whatever is accepted is plain, finite JSON


@FAST
@given(st.binary(max_size=200))
def test_utf8_reader(raw):
    outcome(lambda: decode_utf8(raw, "fuzz.txt"))


yaml_text = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab:-&*[]{},\n 1'\"!#|>")), max_size=120),
    json_values.map(lambda v: json.dumps(v)),
)


@FAST
@given(yaml_text)
def test_yaml_reader(text):
    outcome(lambda: parse_yaml(text, "fuzz.yaml"))


entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "Q4"]), json_values),
    "shape": st.lists(st.one_of(st.integers(-2, 9), st.booleans()), max_size=3),
    "data_offsets": st.lists(st.one_of(st.integers(-4, 80), st.text(max_size=2)), min_size=0, max_size=3),
})
headers = st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(entry, json_values), max_size=4)


@FAST
@given(headers, st.integers(0, 80))
def test_safetensors_header_checks(header, data_bytes):
    entries = outcome(lambda: check_safetensors_header(header, data_bytes, Path("fuzz.safetensors")))
    if not isinstance(entries, BitcpmError):
        spans = sorted(tuple(e["data_offsets"]) for e in entries.values() if e["data_offsets"][1] > e["data_offsets"][0])
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never overlapping
        assert all(0 <= e["data_offsets"][0] <= e["data_offsets"][1] <= data_bytes for e in entries.values())


@settings(max_examples=60, deadline=None, database=None)
@given(headers, st.binary(max_size=64), st.integers(-8, 8))
def test_safetensors_file_reader(header, data, length_skew):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_skew)) + raw + data)
        outcome(lambda: read_safetensors_header(path))


result_items = st.fixed_dictionaries({"token_ids": st.one_of(st.lists(st.integers(-3, 2**33), max_size=4),
                                                             json_values)},
                                     optional={"id": json_values, "prompt": json_values, "top_logprobs": json_values})
documents = st.one_of(
    st.lists(st.one_of(result_items, json_values), max_size=3),
    st.fixed_dictionaries({"schema": st.sampled_from(["bitcpm.results/1", "bitcpm.results/2", 1]),
                           "results": st.one_of(st.lists(result_items, max_size=3), json_values)},
                          optional={"sampling": json_values, "model": json_values}),
    json_values,
)


@settings(max_examples=100, deadline=None, database=None)
@given(documents)
def test_results_reader(document):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.json"
        path.write_text(json.dumps(document))
        value = outcome(lambda: read_results(path))
    if not isinstance(value, BitcpmError):
        meta, items = value
        assert items and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                             for item in items for t in item["token_ids"])
