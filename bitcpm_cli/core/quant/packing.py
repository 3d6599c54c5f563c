"""2-bit packing of ternary codes: 4 codes a byte along the input dimension.

Code c in {-1, 0, +1} is stored as c + 1 in {0, 1, 2}; byte = c0 | c1 << 2 | c2 << 4 | c3 << 6, where c0 is the
lowest input index. Rows whose length is not a multiple of 4 are padded with code 0 (stored as 1).
"""

from __future__ import annotations

import torch

from bitcpm_cli.core.errors import QuantError

CODES_PER_BYTE = 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., n] in {-1, 0, 1} -> uint8 [..., ceil(n / 4)]."""
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise QuantError("pack_ternary: codes outside {-1, 0, +1}", hint="only ternary weights pack to 2 bits")
    n = codes.shape[-1]
    pad = (-n) % CODES_PER_BYTE
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    if pad:
        stored = torch.nn.functional.pad(stored, (0, pad), value=1)
    stored = stored.reshape(*codes.shape[:-1], -1, CODES_PER_BYTE)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device)
    return (stored << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n / 4)] -> int8 codes [..., n]."""
    if packed.dtype != torch.uint8 or packed.shape[-1] != -(-n // CODES_PER_BYTE):
        raise QuantError(f"unpack_ternary: expected uint8 [..., {-(-n // CODES_PER_BYTE)}], "
                         f"got {packed.dtype} {tuple(packed.shape)}", hint="the packed tensor does not match its shape")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    stored = (packed.unsqueeze(-1) >> shifts) & 3
    if bool((stored == 3).any()):
        raise QuantError("unpack_ternary: found the unused 2-bit code 3", hint="the packed tensor is corrupt")
    codes = stored.reshape(*packed.shape[:-1], -1)[..., :n]
    return codes.to(torch.int8) - 1
