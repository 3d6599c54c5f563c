"""The activation quantizers equal their references bit for bit (issue #25, first "What must hold" bullet).

References, cited by the vectors and transcribed below:
- ggml (github.com/ggml-org/llama.cpp), `ggml/src/ggml-quants.c` at 01243c587feceaa5d6a6c2305535ef2f549c48b8:
  `nearest_int` (float + 12582912.f, mantissa bits: round half to even of the float32 value), `quantize_row_q8_K_ref`
  (the Q8_K activations of TQ1_0 / TQ2_0 matmuls) and `quantize_row_q8_0_ref` (the portable Q8_0: `1/d`, roundf).
- ggml `ggml/src/ggml-cpu/arch/x86/quants.c` at 04e1dd75ab73c5c1814474138d8b18e9613f3d80: `quantize_row_q8_K` calls
  `quantize_row_q8_K_ref`; `quantize_row_q8_0`, AVX2/AVX branch: `d = max/127.f` stored fp16, `id = 127.f/max`,
  `_mm256_round_ps(_MM_ROUND_NEAREST)` (half to even), `_mm256_cvtps_epi32` + saturating packs.
- BitNet b1.58 `activation_quant` (Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"):
  `scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)`,
  `y = (x * scale).round().clamp_(-128, 127) / scale` (run here on the float32 value of the input, as bitcpm does).

(a) hand-derived vectors, (b) float32 transcriptions on random inputs, (c) ggml's own compiled quantizers through
the shared libraries llama-cpp-python ships, (d) the straight-through gradient, (e) non-finite inputs.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bitcpm_cli.core.quant.activations import activation_codes, dequantized, fake_quantize_activations

F32 = np.float32
BLOCKS = {"q8_k": 256, "q8_0": 32}


# ---- transcriptions of the reference code ----------------------------------------------------------------------------
def bitnet_activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitNet b1.58's reference `activation_quant`, verbatim, on float32: (codes, scale, dequantized). Its `127.0 /
    tensor` is what torch computes for that expression (`tensor.reciprocal() * 127`), which the reference inherits."""
    x = x.float()
    scale = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    codes = (x * scale).round().clamp_(-128, 127)
    return codes, scale, codes / scale


def nearest_int(fval: np.ndarray) -> np.ndarray:
    """ggml-quants.c `nearest_int`: `val = fval + 12582912.f` (float32), reinterpret as int,
    `(i & 0x007fffff) - 0x00400000`."""
    val = (fval.astype(F32) + F32(12582912.0)).astype(F32)
    i = val.view(np.int32).astype(np.int64)
    return (i & 0x007FFFFF) - 0x00400000


def q8_k_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c `quantize_row_q8_K_ref` on a float32 row: (int8 codes [blocks, 256], float32 d [blocks])."""
    rows = x.reshape(-1, 256).astype(F32)
    qs, ds = np.zeros(rows.shape, np.int8), np.zeros(len(rows), F32)
    for i, row in enumerate(rows):
        amax, peak = 0.0, 0.0
        for value in row.tolist():  # float32 values held exactly as Python floats
            if abs(value) > amax:  # `if (ax > amax) { amax = ax; max = x[j]; }`: the first of largest |x|
                amax, peak = abs(value), value
        if not amax:  # `y[i].d = 0; memset(y[i].qs, 0, QK_K)`
            continue
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            iscale = F32(-127.0) / F32(peak)  # `const float iscale = -127.f/max;`
            v = np.minimum(127, nearest_int((iscale * row).astype(F32)))  # `MIN(127, nearest_int(iscale*x[j]))`
            qs[i] = v.astype(np.int8)  # the int -> int8_t store (two's complement wrap)
            ds[i] = F32(1.0) / iscale  # `y[i].d = 1/iscale;`
    return qs, ds


def q8_0_avx2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """arch/x86/quants.c `quantize_row_q8_0`, AVX2 branch: (int8 codes [blocks, 32], fp32 of the fp16 d)."""
    rows = x.reshape(-1, 32).astype(F32)
    qs, ds = np.zeros(rows.shape, np.int8), np.zeros(len(rows), F32)
    for i, row in enumerate(rows):
        max_scalar = F32(np.abs(row).max())
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ds[i] = F32(max_scalar / F32(127.0)).astype(np.float16).astype(F32)  # GGML_CPU_FP32_TO_FP16(max/127.f)
            inverse = F32(127.0) / max_scalar if max_scalar != 0 else F32(0.0)  # `127.f / maxScalar : 0.0f`
            rounded = np.rint((row * inverse).astype(F32))  # _mm256_mul_ps, _mm256_round_ps(_MM_ROUND_NEAREST)
        ints = np.where(np.isfinite(rounded) & (np.abs(rounded) < 2.0**31), rounded, -(2.0**31))  # cvtps_epi32
        qs[i] = np.clip(ints, -128, 127).astype(np.int8)  # _mm256_packs_epi32 / _epi16 saturate
    return qs, ds


def q8_0_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c `quantize_row_q8_0_ref` (what bitcpm does not follow): `d = amax/127`, `id = d ? 1.0f/d : 0`,
    `roundf(x*id)` (half away from zero)."""
    rows = x.reshape(-1, 32).astype(F32)
    qs, ds = np.zeros(rows.shape, np.int8), np.zeros(len(rows), F32)
    for i, row in enumerate(rows):
        d = F32(np.abs(row).max()) / F32(127.0)
        with np.errstate(over="ignore", invalid="ignore"):
            inverse = F32(1.0) / d if d else F32(0.0)
            scaled = (row * inverse).astype(F32).astype(np.float64)
        qs[i] = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)  # roundf, exact in float64
        ds[i] = F32(d).astype(np.float16).astype(F32)
    return qs, ds


def reference(x: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 codes shaped like x, float32 multiplier [..., blocks], float32 dequantized) by the transcriptions."""
    if scheme == "int8-token":
        return bitnet_activation_quant(x)
    v = x.detach().float().numpy()
    qs, ds = (q8_k_ref if scheme == "q8_k" else q8_0_avx2)(v.reshape(-1))
    lead = v.shape[:-1] + (v.shape[-1] // BLOCKS[scheme],)
    with np.errstate(over="ignore", invalid="ignore"):
        values = (qs.astype(F32) * ds[:, None]).astype(F32)  # dequantize_row_q8_K / _q8_0: `d * qs[j]`
    return (torch.from_numpy(qs.astype(F32).reshape(v.shape)), torch.from_numpy(ds.reshape(lead)),
            torch.from_numpy(values.reshape(v.shape)))


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor's bit patterns (so -0.0 and 0.0 differ)."""
    return t.contiguous().view(torch.int32)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN equal to NaN (a huge block can overflow to inf * 0 in both)."""
    return a.dtype == b.dtype and a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_matches_reference(x: torch.Tensor, scheme: str) -> None:
    codes, multiplier = activation_codes(x, scheme)
    ref_codes, ref_multiplier, ref_values = reference(x, scheme)
    assert codes.dtype == multiplier.dtype == torch.float32
    assert same(codes, ref_codes)
    assert torch.equal(bits(multiplier), bits(ref_multiplier))
    assert same(dequantized(x, scheme), ref_values)
    assert same(fake_quantize_activations(x, scheme), ref_values.to(x.dtype))


def block(values: dict[int, float], size: int) -> torch.Tensor:
    """A float32 block of `size` zeros with the given {position: value}."""
    out = torch.zeros(size)
    for position, value in values.items():
        out[position] = value
    return out


# ---- (a) hand-derived vectors ----------------------------------------------------------------------------------------
def test_int8_token_vectors():
    """BitNet activation_quant: amax 31.75 gives scale 4 (127/31.75; the reciprocal-multiply is exact here), so
    0.625 -> 2.5 -> 2 and 0.875 -> 3.5 -> 4 (torch.round: half to even), the negative max -> -127; an all-zero token
    keeps the 1e-5 clamp: codes 0, scale 127/1e-5, values 0."""
    x = torch.tensor([[0.625, 0.875, -0.625, -31.75, 31.75, 0.0], [0.0] * 6])
    codes, scale = activation_codes(x, "int8-token")
    assert codes.tolist() == [[2, 4, -2, -127, 127, 0], [0] * 6]
    assert scale[0].item() == 4.0
    assert torch.equal(scale[1], 127.0 / torch.tensor([1e-5]))
    assert dequantized(x, "int8-token").tolist() == [[0.5, 1.0, -0.5, -31.75, 31.75, 0.0], [0.0] * 6]
    assert_matches_reference(x, "int8-token")


def test_q8_k_vectors_sign_of_max_ties_and_halves():
    """quantize_row_q8_K_ref: max = -15.875 (the first of largest |x|; +15.875 comes later) gives
    iscale = -127/max = 8 exactly and d = 1/8: codes keep their sign, 0.3125 -> 2.5 -> 2, 0.4375 -> 3.5 -> 4,
    -0.3125 -> -2, 0.0625 -> 0.5 -> 0 (nearest_int: half to even); MIN(127, v) only caps the top."""
    x = block({0: 0.3125, 1: 0.4375, 2: -0.3125, 3: 0.0625, 4: 0.1875, 5: -15.875, 9: 15.875}, 256)
    codes, d = activation_codes(x, "q8_k")
    assert codes[:10].tolist() == [2, 4, -2, 0, 2, -127, 0, 0, 0, 127]
    assert d.tolist() == [0.125]
    # The same values with the positive one first: max = +15.875, iscale = -8, every code flips sign, d = -1/8.
    flipped = x.clone()
    flipped[5], flipped[9] = 15.875, -15.875
    codes, d = activation_codes(flipped, "q8_k")
    assert codes[:10].tolist() == [-2, -4, 2, 0, -2, -127, 0, 0, 0, 127]
    assert d.tolist() == [-0.125]
    assert torch.equal(dequantized(x, "q8_k")[:5], dequantized(flipped, "q8_k")[:5])
    for values in (x, flipped):
        assert_matches_reference(values, "q8_k")


def test_q8_k_rounds_the_float32_product():
    """nearest_int rounds the float32 product `iscale*x[j]`, not the exact one: with max = -3, iscale =
    float32(127/3); x = 2.019685 gives the float32 product 85.5 (exactly 85.4999970...) -> 86, and -2.444882 gives
    -103.5 (exactly -103.4999980...) -> -104."""
    x = block({0: -3.0, 1: 2.019685, 2: -2.444882}, 256)
    iscale = np.float32(-127.0) / np.float32(-3.0)
    assert iscale * np.float32(2.019685) == np.float32(85.5)
    assert iscale * np.float32(-2.444882) == np.float32(-103.5)
    codes, _ = activation_codes(x, "q8_k")
    assert codes[:3].tolist() == [-127, 86, -104]
    assert_matches_reference(x, "q8_k")


def test_q8_k_zero_and_vanishing_blocks():
    """An all-zero block (+0 or -0): d = 0, codes 0. A block whose max is so small that -127/max overflows to inf
    (|max| < 127/FLT_MAX): nearest_int(+-inf or NaN) stores 0, d = 1/iscale = 0: the dequantized block is 0."""
    x = torch.stack([torch.zeros(256), torch.full((256,), -0.0), block({3: -1e-37, 7: 5e-38, 9: 1e-45}, 256)])
    codes, d = activation_codes(x.reshape(-1), "q8_k")
    assert not codes.any() and not d.any()
    assert not dequantized(x, "q8_k").any()
    assert_matches_reference(x, "q8_k")


def test_q8_0_vectors_half_even_unlike_the_portable_reference():
    """quantize_row_q8_0 (AVX2): amax 15.875 (on a negative value) gives id = 127/15.875 = 8 and d = fp16(0.125):
    0.3125 -> 2.5 -> 2 and -0.3125 -> -2 (half to even) where quantize_row_q8_0_ref's roundf gives 3 and -3."""
    x = block({0: 0.3125, 1: 0.4375, 2: -0.3125, 3: 0.0625, 4: -15.875, 5: 15.875}, 32)
    codes, d = activation_codes(x, "q8_0")
    assert codes[:6].tolist() == [2, 4, -2, 0, -127, 127]
    assert d.tolist() == [0.125]
    ref_codes, _ = q8_0_ref(x.numpy())
    assert ref_codes[0, :6].tolist() == [3, 4, -3, 1, -127, 127]
    assert_matches_reference(x, "q8_0")


def test_q8_0_multiplies_by_127_over_max_unlike_the_portable_reference():
    """AVX2 `id = 127.f/max` vs the reference's `1.0f/(max/127)`: for max 0.9816758 they are 129.3706 and
    129.37062, and x = -0.8927839 scales to -115.49999 (-> -115) against -115.50001 (-> -116)."""
    x = block({0: 0.9816758, 1: -0.8927839}, 32)
    codes, _ = activation_codes(x, "q8_0")
    assert codes[1].item() == -115
    assert q8_0_ref(x.numpy())[0][0, 1] == -116
    assert_matches_reference(x, "q8_0")


def test_q8_0_scale_rounds_to_fp16():
    """d = fp16(max/127), round half to even: max 1.0 -> 1/127 -> 0.00787353515625; max 127*(1+1/2048) sits halfway
    between fp16 1.0 and 1.0009765625 -> 1.0 (even); 127*(1+3/2048) -> 1.001953125 (even). Codes use 127/max."""
    x = torch.cat([block({0: 1.0, 1: -0.5}, 32), block({2: 127 * (1 + 1 / 2048)}, 32),
                   block({5: -127 * (1 + 3 / 2048)}, 32)])
    codes, d = activation_codes(x, "q8_0")
    assert d.tolist() == [0.00787353515625, 1.0, 1.001953125]
    assert codes[[0, 1, 34, 69]].tolist() == [127, -64, 127, -127]  # -0.5*127 = -63.5 -> -64 (even)
    assert dequantized(x, "q8_0")[0].item() == 127 * 0.00787353515625
    assert_matches_reference(x, "q8_0")


def test_q8_0_zero_and_vanishing_blocks():
    """An all-zero block: id = 0, codes 0, d = 0. A block with 127/max overflowing: x*inf is +-inf or NaN, which
    _mm256_cvtps_epi32 turns into INT_MIN and the packs into -128; d = fp16(max/127) = 0, so the block is 0."""
    x = torch.cat([torch.zeros(32), block({3: -1e-37, 9: 1e-45}, 32)])
    codes, d = activation_codes(x, "q8_0")
    assert not codes[:32].any() and codes[32:].eq(-128).all()
    assert not d.any() and not dequantized(x, "q8_0").any()
    assert_matches_reference(x, "q8_0")


# ---- (b) the transcriptions on random inputs -------------------------------------------------------------------------
def random_activations(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normal values at mixed magnitudes per token, with zeros, exact ties of |max| and an all-zero token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    x *= torch.tensor([1e-3, 1.0, 37.0, 1e4])[torch.randint(0, 4, shape[:-1] + (1,), generator=generator)]
    x[torch.rand(shape, generator=generator) < 0.05] = 0.0
    flat = x.view(-1, shape[-1])
    flat[0] = 0.0
    flat[1, 5] = -4 * flat[1].abs().max()  # a negative max of its token, 256-block and 32-block ...
    flat[1, 20] = -flat[1, 5]  # ... and the same |max| later with the other sign
    return x.to(dtype)


SHAPES = [(2, 3, 512), (1, 5, 256), (3, 2, 1024)]


@pytest.mark.parametrize("scheme", ["int8-token", "q8_k", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_to_the_transcriptions_on_random_inputs(scheme, dtype):
    for seed, shape in enumerate(SHAPES):
        assert_matches_reference(random_activations(shape, seed, dtype), scheme)


# ---- (c) ggml's own compiled quantizers ------------------------------------------------------------------------------
GGML_TYPE_Q8_0, GGML_TYPE_Q8_K = 8, 15  # ggml.h enum ggml_type
BLOCK_BYTES = {GGML_TYPE_Q8_0: 34, GGML_TYPE_Q8_K: 292}  # block_q8_0: fp16 d, int8 qs[32]; block_q8_K: float d,
# int8 qs[256], int16 bsums[16] (ggml-common.h)


class _TypeTraitsCpu(ctypes.Structure):
    """ggml-cpu.h `struct ggml_type_traits_cpu`."""

    _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


_ROW = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Ggml:
    """ctypes access to the ggml libraries bundled with llama-cpp-python."""

    def __init__(self, folder: Path):
        found = {name: sorted(folder.glob(f"lib{name}.*")) for name in ("ggml-base", "ggml-cpu")}
        missing = [name for name, paths in found.items() if not paths]
        if missing:
            pytest.skip(f"llama_cpp/lib has no {', '.join(missing)} shared library (a build with dynamic CPU "
                        "backends?)")
        self.base = ctypes.CDLL(str(found["ggml-base"][0]), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(str(found["ggml-cpu"][0]), mode=ctypes.RTLD_GLOBAL)
        self.cpu.ggml_cpu_init()
        self.cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_TypeTraitsCpu)
        self.cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
        self.base.ggml_type_size.restype = ctypes.c_size_t
        self.base.ggml_type_size.argtypes = [ctypes.c_int]
        for ggml_type, size in BLOCK_BYTES.items():
            assert self.base.ggml_type_size(ggml_type) == size

    def from_float(self, ggml_type: int):
        """The CPU backend's activation quantizer for `ggml_type`: what a matmul runs on its src1."""
        return _ROW(self.cpu.ggml_get_type_traits_cpu(ggml_type).contents.from_float)

    def symbol(self, name: str):
        for library in (self.base, self.cpu):
            if hasattr(library, name):
                return _ROW(ctypes.cast(getattr(library, name), ctypes.c_void_p).value)
        pytest.skip(f"the bundled ggml does not export {name}")

    @staticmethod
    def run(quantize, x: np.ndarray, ggml_type: int) -> tuple[np.ndarray, np.ndarray]:
        """(int8 codes [blocks, block], float32 d [blocks]) from one row quantizer call on float32 `x`."""
        x = np.ascontiguousarray(x, dtype=F32).reshape(-1)
        blocks = x.size // (256 if ggml_type == GGML_TYPE_Q8_K else 32)
        out = ctypes.create_string_buffer(BLOCK_BYTES[ggml_type] * blocks)
        quantize(x.ctypes.data, ctypes.addressof(out), x.size)
        raw = np.frombuffer(out.raw, np.uint8).reshape(blocks, -1)
        if ggml_type == GGML_TYPE_Q8_K:
            return raw[:, 4:260].copy().view(np.int8), raw[:, :4].copy().view(F32)[:, 0]
        return raw[:, 2:].copy().view(np.int8), raw[:, :2].copy().view(np.float16)[:, 0].astype(F32)


@pytest.fixture(scope="module")
def ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    return Ggml(Path(llama_cpp.__file__).parent / "lib")


def edge_rows(size: int) -> torch.Tensor:
    """Random tokens plus the hand-derived blocks above, as rows of `size` values (the vanishing block last)."""
    rows = [random_activations((4, size), 7).reshape(-1)]
    for values in ({0: 0.3125, 1: 0.4375, 2: -0.3125, 3: 0.0625, 4: -15.875, 5: 15.875},
                   {0: -3.0, 1: 2.019685, 2: -2.444882}, {0: 0.9816758, 1: -0.8927839}, {0: 1.0, 1: -0.5},
                   {2: 127 * (1 + 1 / 2048)}, {}, {3: -1e-37, 9: 1e-45}):  # the vanishing block last
        rows.append(block(values, size))
    return torch.cat(rows)


def assert_ggml_equal(x: torch.Tensor, scheme: str, ggml_codes: np.ndarray, ggml_d: np.ndarray) -> None:
    codes, multiplier = activation_codes(x, scheme)
    assert np.array_equal(codes.numpy().reshape(ggml_codes.shape).astype(np.int8), ggml_codes)
    assert np.array_equal(codes.numpy().reshape(ggml_codes.shape), ggml_codes.astype(F32))
    assert np.array_equal(multiplier.numpy().reshape(-1).view(np.int32), ggml_d.view(np.int32))


def test_q8_k_equals_ggml_cpu_kernel(ggml):
    """The Q8_K quantizer llama.cpp's CPU matmul calls (type_traits_cpu[Q8_K].from_float) and
    quantize_row_q8_K_ref, on random and edge inputs: the same codes and the same float32 d, bit for bit."""
    x = edge_rows(256)
    for quantize in (ggml.from_float(GGML_TYPE_Q8_K), ggml.symbol("quantize_row_q8_K_ref")):
        assert_ggml_equal(x, "q8_k", *ggml.run(quantize, x.numpy(), GGML_TYPE_Q8_K))


def test_q8_0_equals_ggml_avx2_kernel(ggml):
    """type_traits_cpu[Q8_0].from_float (quantize_row_q8_0) on an AVX2 build: the same codes and fp16 d."""
    if not ggml.cpu.ggml_cpu_has_avx2():
        pytest.skip("the bundled ggml CPU backend is not built for AVX2, whose Q8_0 kernel bitcpm matches")
    x = edge_rows(32)
    assert_ggml_equal(x, "q8_0", *ggml.run(ggml.from_float(GGML_TYPE_Q8_0), x.numpy(), GGML_TYPE_Q8_0))


def test_q8_0_portable_reference_differs_where_expected(ggml):
    """ggml's own quantize_row_q8_0_ref equals the roundf transcription, and differs from bitcpm on the half-way and
    1/d cases. (Its vanishing block is left out: `(int8_t)roundf(NaN)` is undefined behaviour in C.)"""
    x = edge_rows(32)[:-32]
    ref_codes, ref_d = ggml.run(ggml.symbol("quantize_row_q8_0_ref"), x.numpy(), GGML_TYPE_Q8_0)
    mine_codes, mine_d = q8_0_ref(x.numpy())
    assert np.array_equal(ref_codes, mine_codes) and np.array_equal(ref_d, mine_d)
    codes, _ = activation_codes(x, "q8_0")
    assert not np.array_equal(codes.numpy().reshape(ref_codes.shape), ref_codes.astype(F32))


# ---- (d) straight-through estimator ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8-token", "q8_k", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_passes_straight_through(scheme, dtype):
    x = random_activations((2, 3, 256), 11, dtype).requires_grad_(True)
    y = fake_quantize_activations(x, scheme)
    assert y.dtype == dtype and y.shape == x.shape and not torch.equal(y, x)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(upstream)
    assert torch.equal(x.grad, upstream)


def test_none_returns_the_input_itself():
    x = torch.randn(2, 64, requires_grad=True)
    assert fake_quantize_activations(x, "none") is x


# ---- (e) non-finite inputs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8-token", "q8_k", "q8_0"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_stays_in_its_token_or_block(scheme, bad):
    """A NaN or infinity makes its own token (int8-token) or block non-finite and leaves the others as they were;
    nothing raises."""
    x = random_activations((2, 512), 5)
    x[1, 300] = bad
    out = fake_quantize_activations(x, scheme)
    clean = fake_quantize_activations(x[:1], scheme)
    assert torch.equal(out[:1], clean)
    span = slice(0, 512) if scheme == "int8-token" else slice(256, 512) if scheme == "q8_k" else slice(288, 320)
    assert not out[1, span].isfinite().any()
    rest = torch.ones(512, dtype=torch.bool)
    rest[span] = False
    assert torch.equal(out[1, rest], reference(x[1:].clone().masked_fill_(~rest, 0.0), scheme)[2][0, rest])


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["int8-token", "q8_k", "q8_0"])
def test_cuda_equals_cpu_without_host_sync(scheme):
    """On CUDA the codes, multipliers and outputs are those of the CPU bit for bit (a tensor divisor keeps
    `127/max` one correctly rounded division there too), and the forward never synchronises with the host."""
    x = torch.cat([random_activations((3, 1024), 9).view(-1, 256), edge_rows(256).view(-1, 256)])
    on_device, on_device_bf16 = x.cuda(), x.to(torch.bfloat16).cuda()  # copies synchronise: before the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        codes, multiplier = activation_codes(on_device, scheme)
        out = fake_quantize_activations(on_device_bf16, scheme)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected_codes, expected_multiplier = activation_codes(x, scheme)
    assert torch.equal(codes.cpu(), expected_codes)
    assert torch.equal(bits(multiplier.cpu()), bits(expected_multiplier))
    assert torch.equal(out.cpu(), fake_quantize_activations(x.to(torch.bfloat16), scheme))
