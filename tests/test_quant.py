"""Tests for quant.py: nibble packing, storage size, the per-element error bound, odd shapes,
input validation, matmul accuracy, save/load, and moving to the GPU.

Each test checks against an exact invariant or an independent reference written here
(per-group scales from max|w|, the scale/2 rounding bound, a uniform-noise error model).
"""
import io

import pytest
import torch

from quant import Int4Tensor, pack_nibbles, quantize_int4, unpack_nibbles


def gaussian(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def per_element(group_values, shape, group_size):
    """Broadcast a per-group tensor (..., n_groups) back over the original (..., K)."""
    last = shape[-1] if len(shape) else 1
    return group_values.float().repeat_interleave(group_size, dim=-1)[..., :last].reshape(shape)


def assert_within_half_scale(w, q):
    scale = per_element(q.scale, w.shape, q.group_size)
    err = (w.float() - q.dequantize()).abs()
    # Slack covers float32 rounding in w / scale and in zero + q * scale, nothing more.
    bound = scale / 2 * (1 + 1e-5) + 1e-6 * w.float().abs()
    assert bool((err <= bound).all()), f"max err/scale = {(err / scale).max().item():.6f}"


def test_pack_unpack_every_nibble_in_every_position():
    low, high = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    pairs = torch.stack((low.flatten(), high.flatten()), dim=-1).to(torch.uint8)  # (256, 2)
    packed = pack_nibbles(pairs)  # (256, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    assert torch.equal(packed[:, 0].long(), low.flatten() + 16 * high.flatten())
    assert torch.equal(unpack_nibbles(packed), pairs)

    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 2, 32)
    codes = unpack_nibbles(every_byte)  # (4, 2, 64)
    assert codes.shape == (4, 2, 64) and int(codes.max()) == 15
    assert torch.equal(codes[..., 0::2].long() + 16 * codes[..., 1::2].long(), every_byte.long())
    assert torch.equal(pack_nibbles(codes), every_byte)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, 3, dtype=torch.uint8), "even last dimension"),
    (torch.zeros(4, dtype=torch.int32), "uint8"),
    (torch.tensor([0, 16], dtype=torch.uint8), "0..15"),
])
def test_pack_nibbles_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_nibbles(bad)


@pytest.mark.parametrize("symmetric", [True, False])
def test_storage_is_half_a_byte_per_value_plus_scales(symmetric):
    w = gaussian(256, 512)
    q = quantize_int4(w, group_size=64, symmetric=symmetric)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (256, 256)
    assert q.scale.dtype == torch.float16 and q.scale.shape == (256, 8)
    zero_bytes = 0 if symmetric else 2 * q.zero.numel()
    assert q.nbytes == q.packed.numel() + 2 * q.scale.numel() + zero_bytes
    assert q.numel() == w.numel() == 2 * q.packed.numel()
    # fp32 is 4 bytes/value; INT4 at group 64 is 0.5 + 2/64 (+ 2/64 for zeros) bytes/value.
    ratio = w.numel() * 4 / q.nbytes
    assert ratio == pytest.approx(4 / (0.5 + (2 if symmetric else 4) / 64))
    assert (7.0 < ratio < 8.0) if symmetric else (6.5 < ratio < 7.5)


@pytest.mark.parametrize("group_size", [2, 16, 64])
def test_symmetric_error_within_half_scale(group_size):
    w = gaussian(32, 128) * 3
    q = quantize_int4(w, group_size, symmetric=True)
    assert q.zero is None
    assert_within_half_scale(w, q)
    # Reference: scale = max|w| / 7 per group, rounded up to the next float16.
    amax = w.reshape(32, -1, group_size).abs().amax(dim=-1)
    scale = q.scale.float()
    assert bool((scale >= amax / 7).all()) and bool((scale <= amax / 7 * (1 + 2**-10)).all())


@pytest.mark.parametrize("group_size", [2, 16, 64])
def test_asymmetric_error_within_half_scale(group_size):
    w = gaussian(32, 128) + 0.5
    q = quantize_int4(w, group_size, symmetric=False)
    assert_within_half_scale(w, q)
    # Reference: zero = group min rounded down to float16, scale covers max - zero in 15 steps.
    groups = w.reshape(32, -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    zero, scale = q.zero.float(), q.scale.float()
    assert bool((zero <= low).all()) and bool((low - zero <= low.abs() * 2**-10).all())
    assert bool((scale >= (high - zero) / 15).all())
    assert bool((scale <= (high - zero) / 15 * (1 + 2**-10)).all())


def test_asymmetric_bound_holds_for_a_narrow_range_far_from_zero():
    # float16 steps near 1000 are 0.5, far wider than this range. A zero rounded to the
    # nearest float16 (1000.5) would sit above every value and cost ~0.2 each; rounded down
    # (1000.0) it costs a wider scale, (1000.3 - 1000) / 15 ~ 0.02, and errors <= 0.01.
    w = 1000.3 + gaussian(4, 64) * 1e-3
    q = quantize_int4(w, 64, symmetric=False)
    assert_within_half_scale(w, q)
    assert (w - q.dequantize()).abs().max() < 0.011


def test_values_on_the_grid_round_trip_exactly():
    codes = torch.randint(-7, 8, (8, 64), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = 7  # each group's max|w| is then exactly 7 * step, so scale == step
    step = 2.0 ** torch.arange(-4, 4).float().unsqueeze(-1)  # (8, 1), exact in float16
    w = codes * step
    assert torch.equal(quantize_int4(w, 64, symmetric=True).dequantize(), w)

    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(2))
    codes[:, 0], codes[:, 1] = 0, 15  # range is exactly 15 * step
    w = -3.0 + codes * step
    assert torch.equal(quantize_int4(w, 64, symmetric=False).dequantize(), w)


@pytest.mark.parametrize("shape", [(3, 70), (5,), (1,), (), (2, 3, 5), (7, 129), (4, 64)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_odd_shapes_pad_and_strip(shape, symmetric):
    w = gaussian(*shape)
    q = quantize_int4(w, 64, symmetric)
    lead, last = (shape[:-1], shape[-1]) if shape else ((), 1)
    k_padded = -(-last // 64) * 64
    assert q.packed.shape == (*lead, k_padded // 2)
    assert q.scale.shape == (*lead, k_padded // 64)
    out = q.dequantize()
    assert out.shape == w.shape and out.dtype == torch.float32
    assert_within_half_scale(w, q)
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_a_single_value_round_trips_to_within_float16_rounding():
    for symmetric in (True, False):
        for w in (torch.tensor([-2.5]), torch.tensor(0.7, dtype=torch.float64)):
            out = quantize_int4(w, 2, symmetric).dequantize(w.dtype)
            assert out.shape == w.shape
            torch.testing.assert_close(out, w, rtol=2e-3, atol=0)


@pytest.mark.parametrize("make, kwargs, match", [
    (lambda: gaussian(4, 8), {"group_size": 3}, "group_size must be an even integer"),
    (lambda: gaussian(4, 8), {"group_size": 0}, "group_size must be an even integer"),
    (lambda: gaussian(4, 8), {"group_size": 1}, "group_size must be an even integer"),
    (lambda: torch.arange(8), {}, "floating-point"),
    (lambda: [1.0, 2.0], {}, "floating-point"),
    (lambda: torch.zeros(0, 8), {}, "empty"),
    (lambda: torch.tensor([1.0, float("nan")]), {}, "finite"),
    (lambda: torch.tensor([1.0, float("inf")]), {}, "finite"),
    (lambda: torch.tensor([1e6, 1.0]), {}, "float16"),
    (lambda: torch.tensor([-1e5, 1.0]), {"symmetric": False}, "float16"),
])
def test_invalid_inputs_raise(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_int4(make(), **kwargs)


def test_inconsistent_state_is_rejected():
    state = quantize_int4(gaussian(4, 128), 64).state_dict()
    state["scale"] = state["scale"][:, :1]
    with pytest.raises(ValueError, match="inconsistent Int4Tensor"):
        Int4Tensor.from_state_dict(state)


@pytest.mark.parametrize("symmetric, expected", [(True, 0.109), (False, 0.092)])
def test_matmul_with_dequantized_weight(symmetric, expected):
    # Model: rounding error is uniform in [-s/2, s/2], so its RMS is s / sqrt(12). With
    # s = max|w| / 7 and E[max of 64 |N(0,1)|] ~ 2.64, the weight's relative Frobenius error
    # is ~ 2.64 / (7 sqrt(12)) ~ 0.109 (symmetric); with s = (max - min) / 15 and a range of
    # ~ 4.8 it is ~ 0.092 (asymmetric). For x independent of the error, ||x dW|| / ||x W||
    # has the same expectation. So 4-bit costs ~10% of the product: < 0.12 either way.
    weight = gaussian(512, 256)  # (in, out)
    x = gaussian(64, 512, seed=1)  # (N, in)
    # Groups must run along `in`, the contracted dimension, so quantize the transpose.
    q = quantize_int4(weight.T.contiguous(), 64, symmetric)
    approx = q.dequantize().T  # (in, out)
    exact = x @ weight
    rel = ((x @ approx - exact).norm() / exact.norm()).item()
    noise_rms = ((q.scale.float() ** 2).mean() / 12).sqrt()
    predicted = (noise_rms / weight.pow(2).mean().sqrt()).item()
    assert rel < 0.12
    assert rel == pytest.approx(predicted, rel=0.1)
    assert predicted == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("symmetric", [True, False])
def test_state_dict_round_trip_through_torch_save(symmetric):
    q = quantize_int4(gaussian(3, 5, 70), 16, symmetric)
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    loaded = Int4Tensor.from_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(loaded.dequantize(), q.dequantize())
    assert (loaded.shape, loaded.group_size, loaded.symmetric) == (q.shape, 16, symmetric)
    assert loaded.nbytes == q.nbytes and repr(loaded) == repr(q)


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_group_dequantizes_to_zeros(symmetric):
    w = gaussian(4, 256)
    w[1, 64:128] = 0
    w[3] = 0
    q = quantize_int4(w, 64, symmetric)
    assert bool(torch.isfinite(q.scale).all()) and bool((q.scale > 0).all())
    out = q.dequantize()
    assert torch.equal(out[1, 64:128], torch.zeros(64)) and torch.equal(out[3], torch.zeros(256))
    assert_within_half_scale(w, q)
    assert torch.equal(quantize_int4(torch.zeros(10), 4, symmetric).dequantize(), torch.zeros(10))


def test_to_returns_a_new_tensor_and_keeps_the_original():
    q = quantize_int4(gaussian(8, 64), 32, symmetric=False)
    moved = q.to(torch.device("cpu"))
    assert isinstance(moved, Int4Tensor) and moved is not q and moved.device == torch.device("cpu")
    assert torch.equal(moved.dequantize(), q.dequantize())
    assert "Int4Tensor(shape=(8, 64), group_size=32, asymmetric" in repr(q)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
def test_pinned_copy_to_cuda_dequantizes_like_cpu(symmetric):
    w = gaussian(96, 200)
    q = quantize_int4(w, 64, symmetric)
    pinned = q.pin_memory()
    assert pinned.packed.is_pinned() and pinned.scale.is_pinned()
    on_gpu = pinned.to("cuda", non_blocking=True)
    assert on_gpu.device.type == "cuda" and q.device.type == "cpu"
    out = on_gpu.dequantize()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), q.dequantize())
    # Quantizing on the GPU itself gives the same codes and scales.
    direct = quantize_int4(w.cuda(), 64, symmetric)
    assert torch.equal(direct.packed.cpu(), q.packed) and torch.equal(direct.scale.cpu(), q.scale)


# ---- quantize_model: a clustered GPT stored as FP16 bases + INT4 factors -------------------

def _clustered_gpt():
    from regroup import recluster_model
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, ffn_hidden=128,
                          n_experts=8, n_clusters=2, rank=16, vocab_size=64, moe="clustered"))
    recluster_model(model)
    return model.eval()


def test_quantize_model_storage_and_output():
    from quant import Int4Store, quantize_model
    model = _clustered_gpt()
    rounded = _clustered_gpt()   # same weights, each rounded in float exactly as stored
    with torch.no_grad():
        for bank in (layer.bank for layer in rounded.moe_layers()):
            for name in ("base1", "base2"):
                getattr(bank, name).copy_(getattr(bank, name).half().float())
            for name in ("u1", "v1", "u2", "v2"):
                w = getattr(bank, name)
                w.copy_(quantize_int4(w.transpose(-1, -2).contiguous()).dequantize().transpose(-1, -2))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx, idx)[0]
        bank = model.moe_layers()[0].bank
        factor_ref = bank.u1.detach().clone()
        assert quantize_model(model) == 2
        out = model(idx, idx)[0]
        torch.testing.assert_close(out, rounded(idx, idx)[0])  # storage changes, math does not
    assert bank.base1.dtype == torch.float16 and isinstance(bank.u1_q, Int4Store)
    assert not any(True for _ in bank.parameters())          # nothing trainable left in the bank
    # groups run along the input dimension d of u1 (d, m*r): stored transposed
    assert bank.u1_q.tensor().shape == factor_ref.transpose(-1, -2).shape
    rel = (out - ref).norm() / ref.norm()
    # At random init the residual factors carry most of each expert's weight, with ~11% RMS
    # INT4 error (see the matmul test); the logits move by a few percent at most.
    assert 0 < rel < 0.05, rel
    assert quantize_model(model) == 2                        # idempotent


def test_quantized_checkpoint_round_trips_and_is_smaller(tmp_path):
    from model import GPT
    from quant import quantize_model
    model = _clustered_gpt()
    torch.save({"model": model.state_dict()}, tmp_path / "float.pt")
    quantize_model(model)
    torch.save({"model": model.state_dict()}, tmp_path / "int4.pt")
    state = torch.load(tmp_path / "int4.pt", weights_only=True)["model"]
    fresh = GPT(model.cfg)                  # float, top-k banks until prepare_state_dict
    fresh.prepare_state_dict(state)
    fresh.load_state_dict(state)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(idx)[0], model(idx)[0])
    bank_bytes = lambda p: sum(v.numel() * v.element_size() for k, v in
                               torch.load(p, weights_only=True)["model"].items() if ".bank." in k)
    assert bank_bytes(tmp_path / "int4.pt") < bank_bytes(tmp_path / "float.pt") / 2
    assert (tmp_path / "int4.pt").stat().st_size < (tmp_path / "float.pt").stat().st_size


def test_quantize_model_leaves_topk_alone():
    from model import GPT, GPTConfig
    from quant import quantize_model
    assert quantize_model(GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, ffn_hidden=16,
                                        n_experts=4, vocab_size=32, block_size=8))) == 0


def test_int4_store_reads_meta_from_the_host_after_loading():
    """tensor() reads shape and group size from a host copy (no GPU sync per forward), which
    loading a checkpoint of another shape and group size must refresh."""
    from quant import Int4Store
    w = torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(0))
    stored = Int4Store(quantize_int4(w, group_size=32))
    other = Int4Store(quantize_int4(torch.randn(2, 4, 64), group_size=64))
    other.load_state_dict(stored.state_dict())
    assert other.tensor().shape == (3, 8, 128) and other.tensor().group_size == 32
    torch.testing.assert_close(other.dequantize(), stored.dequantize(), rtol=0, atol=0)
