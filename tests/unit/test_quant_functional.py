import pytest
import torch

from bitcpm_cli.core.errors import QuantError
from bitcpm_cli.core.quant import LayerQuant, QATLinear, QuantScheme, fake_quantize, fused_scales, prepare, quantize
from bitcpm_cli.core.quant.functional import ternary_codes_from_fused

W = torch.tensor([[0.9, -0.1, 0.0, -2.0],
                  [0.2, 0.2, -0.6, 0.4]])


def test_ternary_per_row_by_hand():
    # row 0: mean|w| = 3.0/4 = 0.75 -> w/s = [1.2, -0.133, 0, -2.667] -> q = [1, 0, 0, -1]
    # row 1: mean|w| = 1.4/4 = 0.35 -> w/s = [0.571, 0.571, -1.714, 1.143] -> q = [1, 1, -1, 1]
    expected = torch.tensor([[0.75, 0.0, 0.0, -0.75], [0.35, 0.35, -0.35, 0.35]])
    assert torch.equal(fake_quantize(W, LayerQuant("ternary", -1)), expected)
    q = quantize(W, LayerQuant("ternary", -1))
    assert q.codes.tolist() == [[1, 0, 0, -1], [1, 1, -1, 1]]
    assert q.codes.dtype == torch.int8
    assert torch.equal(q.scales, torch.tensor([[0.75], [0.35]]))


def test_ternary_per_tensor_by_hand():
    # mean|W| over all 8 = 4.4 / 8 = 0.55; W/s: 0.9->1.64->1, -0.1->0, -2->-1, 0.2->0.36->0, -0.6->-1.09->-1, 0.4->0.73->1
    s = torch.tensor(4.4, dtype=torch.float32) / 8
    expected = torch.tensor([[1, 0, 0, -1], [0, 0, -1, 1]], dtype=torch.float32) * s
    assert torch.equal(fake_quantize(W, LayerQuant("ternary", 0)), expected)


def test_ternary_groups_of_two_by_hand():
    # groups: [0.9,-0.1] s=0.5 -> [1,0]; [0,-2] s=1 -> [0,-1]; [0.2,0.2] s=0.2 -> [1,1]; [-0.6,0.4] s=0.5 -> [-1,1]
    expected = torch.tensor([[0.5, 0.0, 0.0, -1.0], [0.2, 0.2, -0.5, 0.5]])
    assert torch.allclose(fake_quantize(W, LayerQuant("ternary", 2)), expected, atol=0, rtol=0)
    assert quantize(W, LayerQuant("ternary", 2)).scales.shape == (2, 2)


def test_ternary_zero_group_uses_eps_scale():
    q = quantize(torch.zeros(2, 4), LayerQuant("ternary", -1))
    assert torch.equal(q.scales, torch.full((2, 1), 1e-5))
    assert q.codes.abs().sum() == 0


def test_binary_by_hand_sign_of_zero_is_plus_one():
    # row 0: s = 0.75, sign -> [1, -1, +1 (zero), -1]; row 1: s = 0.35, [1, 1, -1, 1]
    expected = torch.tensor([[0.75, -0.75, 0.75, -0.75], [0.35, 0.35, -0.35, 0.35]])
    assert torch.equal(fake_quantize(W, LayerQuant("binary", -1)), expected)


@pytest.mark.parametrize("bits,qmin,qmax", [(2, -2, 1), (4, -8, 7), (8, -128, 127)])
def test_int_symmetric_by_hand(bits, qmin, qmax):
    spec = LayerQuant(f"int{bits}", -1)
    q = quantize(W, spec)
    scales = W.abs().amax(dim=1, keepdim=True) / qmax
    expected_codes = torch.clamp(torch.round(W / scales), qmin, qmax)
    assert torch.equal(q.codes.to(torch.float32), expected_codes)
    assert torch.equal(fake_quantize(W, spec), expected_codes * scales)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax


def test_int4_row_by_hand():
    # row 0: max|w| = 2.0, s = 2/7; codes = round([3.15, -0.35, 0, -7]) = [3, 0, 0, -7]
    assert quantize(W, LayerQuant("int4", -1)).codes[0].tolist() == [3, 0, 0, -7]


def test_int_all_zero_group_gives_zeros_not_nan():
    out = fake_quantize(torch.zeros(1, 4), LayerQuant("int8", -1))
    assert torch.equal(out, torch.zeros(1, 4))


def test_scale_math_in_float32_then_one_cast():
    torch.manual_seed(1)
    w = torch.randn(8, 256, dtype=torch.bfloat16)
    spec = LayerQuant("ternary", 128)
    fused = fake_quantize(w, spec)
    assert fused.dtype == torch.bfloat16
    assert torch.equal(fused, fake_quantize(w.to(torch.float32), spec).to(torch.bfloat16))
    assert fake_quantize(w, spec, dtype=torch.float32).dtype == torch.float32


def test_group_size_not_dividing_names_the_layer():
    with pytest.raises(QuantError) as info:
        fake_quantize(torch.randn(4, 100), LayerQuant("ternary", 128), name="model.layers.3.mlp.down_proj")
    assert "model.layers.3.mlp.down_proj" in info.value.message
    assert "128" in info.value.message and "100" in info.value.message
    assert "-1" in info.value.hint


def test_ste_gradient_is_upstream_gradient_and_forward_is_fused():
    torch.manual_seed(2)
    layer = prepare(torch.nn.Sequential(torch.nn.Linear(8, 6)), QuantScheme(group_size=4))[0]
    assert isinstance(layer, QATLinear)
    x = torch.randn(3, 8)
    fused = fake_quantize(layer.weight.detach(), LayerQuant("ternary", 4)).requires_grad_()
    reference = torch.nn.functional.linear(x, fused, layer.bias.detach())
    out = layer(x)
    assert torch.equal(out.detach(), reference.detach())
    upstream = torch.randn(3, 6)
    out.backward(upstream)
    reference.backward(upstream)
    # STE: the latent weight receives exactly the gradient of the fused weight
    assert torch.equal(layer.weight.grad, fused.grad)


def test_fused_weight_detected_and_scales_recovered():
    torch.manual_seed(3)
    w = torch.randn(4, 256)
    fused = fake_quantize(w, LayerQuant("ternary", 128))
    scales = fused_scales(fused, 128)
    assert scales is not None
    assert torch.equal(scales, quantize(w, LayerQuant("ternary", 128)).scales)
    assert fused_scales(w, 128) is None
    # Per-row detection fails on a weight fused with several group scales per row.
    assert fused_scales(fused, -1) is None
    recovered = ternary_codes_from_fused(fused, 128)
    assert torch.equal(recovered.codes, quantize(w, LayerQuant("ternary", 128)).codes)
    assert torch.equal(recovered.dequantize(), fused)


def test_requantizing_a_fused_weight_rescales_it():
    # Why detection matters: absmean of {-s, 0, +s} is s * nonzero_fraction, not s.
    torch.manual_seed(4)
    fused = fake_quantize(torch.randn(4, 64), LayerQuant("ternary", -1))
    assert not torch.equal(fake_quantize(fused, LayerQuant("ternary", -1)), fused)


@pytest.mark.parametrize("quant_type", ["ternary", "binary", "int4", "int8"])
@pytest.mark.parametrize("group_size", [-1, 0, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_blocks_of_rows_give_the_one_pass_result_bit_for_bit(monkeypatch, quant_type, group_size, dtype):
    from bitcpm_cli.core.quant import functional

    torch.manual_seed(0)
    # 203 rows (the last block is short) x 384: 78k values, so the one pass runs on torch's threads (> 32k values)
    weight = (torch.randn(203, 384) * 0.02).to(dtype)
    spec = LayerQuant(quant_type, group_size)
    threads = torch.get_num_threads()
    one_pass = fake_quantize(weight, spec, dtype=torch.bfloat16), quantize(weight, spec)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16 * 384)  # 16 rows a block: 13 blocks
    assert len(functional._row_blocks(weight, group_size)) == (1 if group_size == 0 else 13)
    blocks = fake_quantize(weight, spec, dtype=torch.bfloat16), quantize(weight, spec)
    assert torch.equal(blocks[0].view(torch.int16), one_pass[0].view(torch.int16))  # bits, so -0.0 != +0.0
    assert torch.equal(blocks[1].codes, one_pass[1].codes)
    assert torch.equal(blocks[1].scales.view(torch.int32), one_pass[1].scales.view(torch.int32))
    assert torch.get_num_threads() == threads  # the blocks ran on one thread; the setting is restored


def test_blocks_restore_the_thread_setting_when_a_block_fails(monkeypatch):
    from bitcpm_cli.core.quant import functional

    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16 * 4)
    threads = torch.get_num_threads()

    def failing(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(functional, "_codes_and_scales", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fake_quantize(torch.randn(64, 4), LayerQuant("ternary", -1))
    assert torch.get_num_threads() == threads


def test_a_non_contiguous_weight_is_quantized_in_one_pass(monkeypatch):
    from bitcpm_cli.core.quant import functional

    torch.manual_seed(0)
    weight = (torch.randn(512, 200) * 0.02).t()  # a strided reduction's order depends on the rows it is given
    spec = LayerQuant("ternary", -1)
    one_pass = fake_quantize(weight, spec)
    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16)
    assert functional._row_blocks(weight, -1) == [slice(0, 200)]
    assert torch.equal(fake_quantize(weight, spec).view(torch.int32), one_pass.view(torch.int32))


def test_blocks_are_written_on_the_weight_s_device_whatever_the_default(monkeypatch):
    from bitcpm_cli.core.quant import functional

    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16)
    weight = torch.randn(64, 8)
    with torch.device("meta"):
        fused, quantized = fake_quantize(weight, LayerQuant("ternary", -1)), quantize(weight, LayerQuant("ternary", -1))
    assert fused.device.type == quantized.codes.device.type == quantized.scales.device.type == "cpu"
    assert torch.equal(fused, fake_quantize(weight, LayerQuant("ternary", -1)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("blocks", [False, True])
def test_finite_refuses_a_weight_with_nan_or_infinity(monkeypatch, bad, blocks):
    from bitcpm_cli.core.quant import functional

    if blocks:
        monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16)
    weight = torch.randn(64, 8)
    weight[40, 3] = bad
    spec = LayerQuant("ternary", -1)
    assert torch.isnan(fake_quantize(weight, spec)[40]).all()  # without `finite` the NaN group is what it is
    for call in (lambda: fake_quantize(weight, spec, name="layers.1.up", finite=True),
                 lambda: quantize(weight, spec, name="layers.1.up", finite=True)):
        with pytest.raises(QuantError, match="layers.1.up: the weight holds NaN or infinite values"):
            call()


def test_threads_quantizing_at_once_restore_the_thread_setting(monkeypatch):
    import threading

    from bitcpm_cli.core.quant import functional

    monkeypatch.setattr(functional, "BLOCK_ELEMENTS", 16)
    threads = torch.get_num_threads()
    weight = torch.randn(2048, 8)
    workers = [threading.Thread(target=lambda: [fake_quantize(weight, LayerQuant("ternary", -1)) for _ in range(5)])
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert torch.get_num_threads() == threads
    fresh = []
    later = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert fresh == [threads]
