"""A checkpoint's tensors as the operands inference multiplies by: each taken by name and checked
for presence, shape and finiteness against what the config implies (so a config that does not
match its weights is refused with the first offending name), with weight norm folded from any of
the three ways checkpoints store it (plain ``weight``, ``weight_g``/``weight_v``, or
``parametrizations.weight.original0/1``), and with the products laid out for time-major inference:
``Dense`` (``x @ W + b``) and ``_TimeConv`` (a convolution as a GEMM per tap over shifted rows, or
one GEMM over an im2col view). Both run on the kernel path ``ttsd.engines.vits.kernels`` chose for
this CPU (``use``): MKL's GEMM through ``torch.addmm``, or oneDNN's linear.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ...errors import LoadError

# safetensors' names for the dtypes a voice's weights come in
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 4 << 20  # bytes of a safetensors file's JSON header (a VITS voice's: about 40 KB)
MAX_DIMS = 8  # a VITS weight has up to 3


class _Entry(NamedTuple):
    """Where one tensor is in a safetensors file, checked against the file (``FileTensors``)."""

    dtype: torch.dtype | None  # None: a dtype ttsd does not read (refused if taken)
    dtype_name: str
    shape: tuple[int, ...]
    begin: int  # bytes from the start of the data
    end: int


class FileTensors:
    """A ``.safetensors`` file's tensors by name, each read from the file into memory of its own
    when it is taken (``pop``), as ``_Weights`` takes them one by one, and never mapped. A context
    manager: the file stays open, once, until it closes.

    safetensors' own loader maps the file, and a mapped file's pages count in the process's
    resident memory from their first touch until the whole mapping goes: while a voice loaded, all
    of its file (60 MB for the built-in voice) sat on top of the weights already converted (a load
    beside a serving voice, as an upgrade does, peaked at 2.2-2.3x the 60 MB it kept,
    ``bench/memory_parts.py``). Read this way, the load peaks at what it keeps plus a tensor or
    two. Tensors never taken (a checkpoint's posterior encoder, which inference does not use) are
    never read.

    A voice's folder is outside input. The file is opened once, never through a link and only if it
    is a regular file, and everything is read through that one open file. safetensors checks it
    first (through ``/proc/self/fd``: the file checked is the file read); the header is then read
    once more and every entry ttsd reads is checked again here (a known dtype, sizes that match the
    shape, inside the file), since the file could have been rewritten in between. ``shape`` tells
    a tensor's shape before it is read, so that a caller refuses a wrong one without allocating it;
    a file cut short since is refused when it is read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = -1
        try:
            # O_NONBLOCK: a FIFO put in the file's place must not block the open
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            info = os.fstat(self._fd)
            if not stat.S_ISREG(info.st_mode):
                raise ValueError("not a regular file")
            from safetensors import safe_open

            by_fd = Path(f"/proc/self/fd/{self._fd}")
            with safe_open(str(by_fd if by_fd.exists() else self.path), framework="pt") as checked:
                names = set(checked.keys())  # safe_open reads and checks the header only
            size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
            if size > MAX_HEADER or 8 + size > info.st_size:
                raise ValueError(f"a {size}-byte header (ttsd reads up to {MAX_HEADER}, within the file)")
            header = json.loads(os.pread(self._fd, size, 8))
            self._start = 8 + size
            self._entries = {name: self._entry(header, name, info.st_size - self._start) for name in names}
        except Exception as exc:
            self.close()
            if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
                raise LoadError(f"{self.path}: weights do not load (a symbolic link)") from exc
            raise LoadError(f"{self.path}: weights do not load ({str(exc).splitlines()[0][:200]})") from exc
        except BaseException:  # a load called off (pacing's Superseded): the file is not left open
            self.close()
            raise

    @staticmethod
    def _entry(header: Any, name: str, data: int) -> _Entry:
        """``name``'s header entry, checked: a dtype, a shape of small non-negative ints, and
        offsets inside the file's ``data`` bytes that hold exactly that many elements."""
        entry = header.get(name) if isinstance(header, dict) else None
        if not isinstance(entry, dict):
            raise ValueError(f"no header entry for {name}")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(type(n) is int and 0 <= n < 1 << 31 for n in shape)
        ):
            raise ValueError(f"{name} has no usable shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise ValueError(f"{name} has no usable offsets")
        begin, end = offsets
        dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        count = math.prod(shape)
        if not 0 <= begin <= end <= data or (dtype is not None and end - begin != count * dtype.itemsize):
            raise ValueError(f"{name}'s offsets do not fit its shape or the file")
        return _Entry(dtype, str(dtype_name), tuple(shape), begin, end)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileTensors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __delitem__(self, name: str) -> None:
        """Forget ``name`` unread (weights inference does not use)."""
        del self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, from the header (nothing read)."""
        return self._entries[name].shape

    def pop(self, name: str, *default: Any) -> Any:
        """The tensor ``name``, read now, and forgotten here (``dict.pop``'s contract)."""
        if name not in self._entries:
            if default:
                return default[0]
            raise KeyError(name)
        if self._fd < 0:
            raise ValueError(f"{self.path}: read after close")
        entry = self._entries.pop(name)
        if entry.dtype is None:
            raise LoadError(f"{self.path}: {name} is {entry.dtype_name}, not a float type ttsd reads")
        raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
        view, got = raw.numpy().data, 0
        while got < len(view):
            count = os.preadv(self._fd, [view[got:]], self._start + entry.begin + got)
            if count <= 0:
                raise LoadError(f"{self.path}: {name} ends early (the file changed while it loaded?)")
            got += count
        return raw.view(entry.dtype).reshape(entry.shape)


class _Weights:
    """A checkpoint's tensors, taken by name with their expected shape."""

    def __init__(self, tensors: dict[str, torch.Tensor] | FileTensors, where: str) -> None:
        self.tensors = tensors
        self.where = where

    def _shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, without reading it from a file."""
        t = self.tensors
        return t.shape(name) if isinstance(t, FileTensors) else tuple(t[name].shape)

    def _mismatch(self, name: str, found: tuple[int, ...], shape: tuple[int, ...]) -> LoadError:
        return LoadError(
            f"{self.where}: config.json does not match the weights ({name} is {found}, the config says {shape})"
        )

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors
        if name in t:
            if self._shape(name) != shape:  # refused before it is read
                raise self._mismatch(name, self._shape(name), shape)
            value = t.pop(name)
        elif (
            name.endswith(".weight")
            and (stem := name[: -len(".weight")])
            and (f"{stem}.weight_v" in t or f"{stem}.parametrizations.weight.original1" in t)
        ):
            v_name, g_name = f"{stem}.weight_v", f"{stem}.weight_g"
            if v_name not in t:
                form = f"{stem}.parametrizations.weight.original"
                v_name, g_name = f"{form}1", f"{form}0"
            if g_name not in t:
                raise LoadError(f"{self.where}: {stem} has a weight-norm direction but no magnitude")
            if self._shape(v_name) != shape:
                raise self._mismatch(v_name, self._shape(v_name), shape)
            if not shape or math.prod(self._shape(g_name)) != shape[0]:  # a magnitude per output channel
                raise LoadError(
                    f"{self.where}: config.json does not match the weights ({g_name} is "
                    f"{self._shape(g_name)}, the config says {shape[0] if shape else 0} values)"
                )
            g, v = t.pop(g_name), t.pop(v_name)
            v = v.float()
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))
            value = g.float().reshape(norm.shape) * v / norm
        else:
            raise LoadError(f"{self.where}: config.json does not match the weights (missing {name})")
        if tuple(value.shape) != shape:
            raise self._mismatch(name, tuple(value.shape), shape)
        value = value.to(torch.float32, copy=True)  # never a view of the caller's tensors
        if not torch.isfinite(value).all():
            raise LoadError(f"{self.where}: weights contain NaN or infinite values ({name})")
        return value

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> Dense:
        """A ``Linear``."""
        weight = self.take(f"{prefix}.weight", (out, inp)).t()
        return Dense(weight, self.take(f"{prefix}.bias", (out,)) if bias else None)

    def pointwise(self, prefix: str, out: int, inp: int) -> Dense:
        """A kernel-1 ``Conv1d``."""
        return Dense(self.take(f"{prefix}.weight", (out, inp, 1))[:, :, 0].t(), self.take(f"{prefix}.bias", (out,)))

    def conv(
        self,
        prefix: str,
        out: int,
        inp: int,
        kernel: int,
        dilation: int = 1,
        padding: int | None = None,
        bias: bool = True,
    ) -> _TimeConv:
        weight = self.take(f"{prefix}.weight", (out, inp, kernel))
        return _TimeConv(
            weight,
            self.take(f"{prefix}.bias", (out,)) if bias else None,
            dilation,
            (kernel - 1) * dilation // 2 if padding is None else padding,
        )


PATHS = ("mkl", "onednn")  # how a product runs: see ttsd.engines.vits.kernels


def _linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class Dense:
    """``x @ W + b`` on time-major ``x`` (T, in): a ``Linear``, or a kernel-1 ``Conv1d``. ``weight``
    is given as the (in, out) matrix; it is kept in the layout its path reads: (in, out) for MKL's
    ``addmm``, (out, in) for oneDNN's linear. One layout at a time, so a path costs no memory."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.path = "mkl"

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out)."""
        a, b = self.weight.shape
        return (b, a) if self.path == "onednn" else (a, b)

    def matrix(self) -> torch.Tensor:
        """The (in, out) matrix (a view)."""
        return self.weight.t() if self.path == "onednn" else self.weight

    def use(self, path: str) -> None:
        if path not in PATHS:
            raise ValueError(f"unknown kernel path {path!r}")
        if path != self.path:
            matrix = self.matrix()
            self.weight = (matrix.t() if path == "onednn" else matrix).contiguous()
            self.path = path

    def to(self, dtype: torch.dtype) -> None:
        self.weight = self.weight.to(dtype)
        self.bias = None if self.bias is None else self.bias.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "onednn":
            return _linear_onednn(x, self.weight, self.bias)
        return x @ self.weight if self.bias is None else torch.addmm(self.bias, x, self.weight)


class _TimeConv:
    """A 1-D convolution on time-major ``(T, C_in)`` input as one GEMM, ``(T, k*C_in) @ (k*C_in,
    C_out)`` (``dense``), or, in float32 on the MKL path, as a GEMM per tap (``_shifted``)."""

    shifted = True  # False: always the one GEMM (bench/rtf.py counts FLOPs so: its counter skips addmm_)

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, padding: int, right: int | None = None
    ) -> None:
        out, inp, kernel = weight.shape
        self.kernel, self.inp, self.dilation = kernel, inp, dilation
        self.left, self.right = padding, padding if right is None else right
        self.dense = Dense(weight.permute(2, 1, 0).reshape(kernel * inp, out), bias)

    @property
    def weight(self) -> torch.Tensor:
        """The (k*C_in, C_out) matrix (a view; rows ``j*C_in..`` are tap ``j``)."""
        return self.dense.matrix()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.dense.bias

    @property
    def path(self) -> str:
        return self.dense.path

    def use(self, path: str) -> None:
        self.dense.use(path)

    def to(self, dtype: torch.dtype) -> None:
        """Keep the weights in ``dtype`` (the input must then be ``dtype`` too)."""
        self.dense.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel > 1 and x.dtype == torch.float32 and self.shifted and self.dense.path == "mkl":
            return self._shifted(x)
        if self.kernel > 1 or self.left or self.right:
            x = F.pad(x, (0, 0, self.left, self.right))
            length = x.shape[0] - (self.kernel - 1) * self.dilation
            x = x.as_strided((length, self.kernel, self.inp), (self.inp, self.dilation * self.inp, 1))
            x = x.reshape(length, self.kernel * self.inp)
        return self.dense(x)

    def _shifted(self, x: torch.Tensor) -> torch.Tensor:
        """The same convolution as one product per tap, each over the rows of ``x`` it reaches,
        added into the output in place: no padded copy and no im2col copy of the input (measured
        5-15 % faster than the one wide product in float32 at the text side's sizes). bf16 keeps
        the one product, which accumulates its taps in float32 inside the kernel."""
        rows, (kernel, dilation, left) = x.shape[0], (self.kernel, self.dilation, self.left)
        length = rows + left + self.right - (kernel - 1) * dilation
        taps = self.weight.view(kernel, self.inp, -1)
        spans = []  # (tap, first output row, end output row, shift: input row = output row + shift)
        for j in range(kernel):
            shift = j * dilation - left
            first, end = max(0, -shift), min(length, rows - shift)
            if end > first:
                spans.append((j, first, end, shift))
        full = next((s for s in spans if s[1] == 0 and s[2] == length), None)
        if full is None:
            out = torch.zeros(length, taps.shape[2]) if self.bias is None else self.bias.expand(length, -1).clone()
        else:
            j, _, _, shift = full
            part = x[shift : shift + length]
            out = part @ taps[j] if self.bias is None else torch.addmm(self.bias, part, taps[j])
        for span in spans:
            if span is not full:
                j, first, end, shift = span
                out[first:end].addmm_(x[first + shift : end + shift], taps[j])
        return out
