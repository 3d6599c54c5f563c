import pytest
import torch

from bitcpm_cli.core.errors import QuantError
from bitcpm_cli.core.quant import pack_ternary, unpack_ternary


@pytest.mark.parametrize("n", [4, 7, 128, 1001])
def test_round_trip_is_exact(n):
    torch.manual_seed(n)
    codes = torch.randint(-1, 2, (5, n), dtype=torch.int8)
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, -(-n // 4))
    assert torch.equal(unpack_ternary(packed, n), codes)


def test_byte_layout_low_bits_first():
    # codes [-1, 0, 1, 1] -> stored [0, 1, 2, 2] -> 0 | 1<<2 | 2<<4 | 2<<6 = 4 + 32 + 128 = 164
    assert pack_ternary(torch.tensor([[-1, 0, 1, 1]])).tolist() == [[164]]


def test_four_codes_a_byte():
    codes = torch.zeros(64, 1024, dtype=torch.int8)
    assert pack_ternary(codes).numel() * 4 == codes.numel()


def test_rejects_non_ternary_codes():
    with pytest.raises(QuantError, match="outside"):
        pack_ternary(torch.tensor([[2, 0, 0, 0]]))


def test_rejects_corrupt_bytes():
    with pytest.raises(QuantError, match="unused 2-bit code 3"):
        unpack_ternary(torch.tensor([[255]], dtype=torch.uint8), 4)
    with pytest.raises(QuantError, match="expected uint8"):
        unpack_ternary(torch.tensor([[0, 0]], dtype=torch.uint8), 4)
