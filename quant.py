"""Float tensor <-> packed INT4 (two 4-bit values per uint8 byte) with group-wise scales.

Owns: `quantize_int4` (float -> `Int4Tensor`), `Int4Tensor.dequantize` (back to float),
the nibble packing underneath (`pack_nibbles` / `unpack_nibbles`), and moving or saving a
quantized tensor (`to`, `pin_memory`, `state_dict` / `from_state_dict`).
Also `Int4Store`, an Int4Tensor held as module buffers (so it is saved, loaded and moved like
any weight), and `quantize_model`, which asks every module that offers `quantize_` to store
itself this way. Does not own: which tensors of a module get quantized (the module's own
`quantize_`, e.g. experts.ClusteredBank), where they live (offload.py), or any INT4 matmul
kernel: callers dequantize and then use a float matmul. Imports nothing from the repo.

Layout. Groups of `group_size` consecutive values run along the LAST dimension of the
tensor given. To group along another dimension (e.g. the input dimension of an
(in, out) weight), pass `w.transpose(-1, -2).contiguous()` and transpose back after
dequantizing. A last dimension that is not a multiple of `group_size` is zero-padded up
to one internally (K_padded) and the padding is stripped again on dequantize.

    symmetric:   scale = max|w| / 7,          q = round(w / scale) in -8..7,  stored q + 8
    asymmetric:  scale = (max - min) / 15,    q = round((w - zero) / scale) in 0..15,
                 zero = min

Scales and zeros are computed in float32 and stored as float16, rounded outward (scale up,
zero down) so that every value still lands inside the grid; q is then computed from the
stored fp16 numbers. Hence, with the stored scale, |w - dequantize(w)| <= scale / 2 for
every element, up to float32 rounding of the dequantize arithmetic itself.
"""
import torch
import torch.nn as nn

# Symmetric codes are stored with this offset so that every nibble is unsigned.
SYMMETRIC_OFFSET = 8


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15, shape (..., n) with n even -> uint8 (..., n // 2).

    Byte j holds element 2j in its low nibble and element 2j + 1 in its high nibble.
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"pack_nibbles needs a uint8 tensor, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"pack_nibbles needs an even last dimension, got {tuple(q.shape)}")
    if q.numel() > 0 and int(q.max()) > 15:
        raise ValueError(f"pack_nibbles needs values in 0..15, got a max of {int(q.max())}")
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> uint8 (..., 2 * n) with values 0..15; the inverse of pack_nibbles."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_nibbles needs a uint8 tensor, got {packed.dtype}")
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1)  # (..., n, 2)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])


class Int4Tensor:
    """A float tensor stored as packed 4-bit codes plus one fp16 scale (and zero) per group.

    packed: uint8 (..., K_padded // 2); scale, zero: float16 (..., K_padded // group_size),
    zero is None when symmetric. `...` are the leading dimensions of `shape`
    (none for a 1-D or 0-D tensor). Build one with `quantize_int4`.
    """

    def __init__(self, packed, scale, zero, shape, group_size, symmetric):
        self.packed = packed
        self.scale = scale
        self.zero = zero
        self.shape = torch.Size(shape)
        self.group_size = int(group_size)
        self.symmetric = bool(symmetric)
        self._check()

    def _check(self):
        # A state_dict from elsewhere may be inconsistent; fail here, not deep in dequantize.
        _check_group_size(self.group_size)
        lead, last = _split_shape(self.shape)
        k_padded = -(-last // self.group_size) * self.group_size
        expected = {"packed": (torch.uint8, (*lead, k_padded // 2)),
                    "scale": (torch.float16, (*lead, k_padded // self.group_size))}
        if not self.symmetric:
            expected["zero"] = expected["scale"]
        problems = []
        for name, (dtype, shape) in expected.items():
            tensor = getattr(self, name)
            if tensor is None or tensor.dtype != dtype or tensor.shape != shape:
                got = None if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
                problems.append(f"{name} is {got}, expected {dtype} {shape}")
        if self.symmetric and self.zero is not None:
            problems.append("a symmetric tensor has no zero")
        if problems:
            raise ValueError(f"inconsistent Int4Tensor for shape {tuple(self.shape)}, "
                             f"group_size {self.group_size}: " + "; ".join(problems))

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """Float tensor of the original shape, on this tensor's device."""
        lead, last = _split_shape(self.shape)
        codes = unpack_nibbles(self.packed).float()  # (..., K_padded)
        codes = codes.reshape(*lead, -1, self.group_size)  # (..., n_groups, group_size)
        scale = self.scale.float().unsqueeze(-1)
        if self.symmetric:
            values = (codes - SYMMETRIC_OFFSET) * scale
        else:
            values = codes * scale + self.zero.float().unsqueeze(-1)
        values = values.reshape(*lead, -1)[..., :last]  # (..., K)
        return values.reshape(self.shape).to(dtype)

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scale] + ([] if self.zero is None else [self.zero])
        return sum(t.numel() * t.element_size() for t in tensors)

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def _map(self, fn):
        zero = None if self.zero is None else fn(self.zero)
        return Int4Tensor(fn(self.packed), fn(self.scale), zero, self.shape, self.group_size,
                          self.symmetric)

    def to(self, device, non_blocking=False) -> "Int4Tensor":
        """A new Int4Tensor with every tensor on `device`; this one is left as it was."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Int4Tensor":
        """A copy in page-locked CPU memory, so a later .to('cuda', non_blocking=True) is async."""
        return self._map(lambda t: t.pin_memory())

    def state_dict(self) -> dict:
        """Plain tensors and python values only, so torch.load(weights_only=True) accepts it."""
        state = {"packed": self.packed, "scale": self.scale, "shape": list(self.shape),
                 "group_size": self.group_size, "symmetric": self.symmetric}
        if self.zero is not None:
            state["zero"] = self.zero
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "Int4Tensor":
        return cls(state["packed"], state["scale"], state.get("zero"), state["shape"],
                   state["group_size"], state["symmetric"])

    def __repr__(self):
        kind = "symmetric" if self.symmetric else "asymmetric"
        return (f"Int4Tensor(shape={tuple(self.shape)}, group_size={self.group_size}, {kind}, "
                f"device={self.device}, nbytes={self.nbytes})")


def quantize_int4(w: torch.Tensor, group_size: int = 64, symmetric: bool = True) -> Int4Tensor:
    """Quantize `w` to 4 bits with one scale (and zero, if asymmetric) per group of the last dim."""
    _check_group_size(group_size)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"quantize_int4 needs a floating-point tensor, got "
                         f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
    if w.numel() == 0:
        raise ValueError(f"quantize_int4 cannot quantize an empty tensor of shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize_int4 needs finite values; the tensor holds inf or nan")

    lead, last = _split_shape(w.shape)
    pad = -last % group_size
    values = w.detach().float().reshape(*lead, last)
    # The zero padding joins the last group's max|w| (or min/max), which can only widen
    # that group's scale: the bound still holds, the grid is just coarser there.
    values = torch.nn.functional.pad(values, (0, pad))  # (..., K_padded)
    groups = values.reshape(*lead, -1, group_size)  # (..., n_groups, group_size)

    if symmetric:
        zero = None
        scale = _fp16_up(groups.abs().amax(dim=-1) / 7)  # (..., n_groups)
        # An all-zero group gets scale 1 rather than 0: no 0 / 0, and it still decodes to 0.
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-8, 7) + SYMMETRIC_OFFSET
    else:
        zero = _fp16_down(groups.amin(dim=-1))  # (..., n_groups)
        # The range is measured from the stored zero, which may sit a little below min.
        scale = _fp16_up((groups.amax(dim=-1) - zero.float()) / 15)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        shifted = groups - zero.float().unsqueeze(-1)
        q = torch.round(shifted / scale.float().unsqueeze(-1)).clamp(0, 15)
    stored = scale if zero is None else torch.cat((scale, zero), dim=-1)
    if not bool(torch.isfinite(stored).all()):
        raise ValueError("quantize_int4: the tensor's range does not fit float16 scales "
                         "(|values| must stay well below 65504 * 7)")

    packed = pack_nibbles(q.to(torch.uint8).reshape(*lead, -1))  # (..., K_padded // 2)
    return Int4Tensor(packed, scale, zero, w.shape, group_size, symmetric)


def _check_group_size(group_size):
    # Odd groups would split a byte's two nibbles across groups.
    valid = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def _split_shape(shape):
    """(leading dims, last dim); a 0-D tensor is treated as a single value of shape (1,)."""
    return (tuple(shape[:-1]), shape[-1]) if len(shape) > 0 else ((), 1)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the smallest float16 >= x, so a scale never shrinks in storage."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the largest float16 <= x, so a zero never rises above its group's min."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


class Int4Store(nn.Module):
    """An Int4Tensor as buffers: packed, scale, zero (empty when symmetric) and meta =
    [group_size, symmetric, *shape]. A checkpoint may hold other shapes or group sizes than
    a freshly built store, so loading resizes the buffers to what the checkpoint holds."""

    def __init__(self, q: Int4Tensor):
        super().__init__()
        self.register_buffer("packed", q.packed)
        self.register_buffer("scale", q.scale)
        self.register_buffer("zero", q.zero if q.zero is not None else q.scale.new_zeros(0))
        self.register_buffer("meta", torch.tensor([q.group_size, int(q.symmetric), *q.shape]))
        # The same values on the host: reading the buffer each forward would sync with the GPU
        # (and cannot be captured in a CUDA graph).
        self._meta = tuple(self.meta.tolist())

    def tensor(self) -> Int4Tensor:
        group_size, symmetric, *shape = self._meta
        return Int4Tensor(self.packed, self.scale, None if symmetric else self.zero, shape,
                          group_size, symmetric)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.tensor().dequantize(dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.packed, self.scale, self.zero))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buf in self.named_buffers(recurse=False):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != buf.shape:
                setattr(self, name, torch.empty_like(incoming, device=buf.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "meta" in state_dict:
            self._meta = tuple(state_dict[prefix + "meta"].tolist())


def quantize_model(model: nn.Module, group_size: int = 64, symmetric: bool = True,
                   base_dtype=torch.float16) -> int:
    """In place, for inference: every module with a `quantize_(group_size, symmetric,
    base_dtype)` method (the clustered expert banks: 16-bit bases, INT4 residual factors)
    stores its weights quantized. Returns how many modules were quantized (0: none)."""
    targets = [m for m in model.modules() if hasattr(m, "quantize_")]
    for module in targets:
        module.quantize_(group_size, symmetric, base_dtype)
    return len(targets)
