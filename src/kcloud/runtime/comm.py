"""Messages between workers: tuples of tensors (and other values) over torch.distributed,
as one flat frame per hop.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# A tuple travels as one flat byte frame: an int64 flag, then each item (a tensor, or any other
# value pickled into bytes) at an 8-byte aligned offset. Where the items sit follows from a
# header of kinds, dtypes and shapes, which both ends keep: a stage's outputs have the same
# shapes micro-batch after micro-batch, so a hop is one message, and the receiver posts the
# next one's receive before it needs it. When the header changes (the first micro-batch, a
# smaller last one, a pickled value of another length), the sender fills the frame the
# receiver expects with the flag set to the new header's length, then sends the header and the
# frame in its new layout. A tensor-parallel group's lead shares what it receives with the
# group's other ranks the same way, one broadcast per tuple.

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_TENSOR, _OBJECT, _CHANNELS_LAST = 0, 1, 2  # a channels-last 4-D tensor travels as NHWC
_FLAG = 8  # bytes of the flag that starts every frame (and the alignment of its items)

Span = tuple[int, torch.dtype, list[int], int, int]  # kind, dtype, shape, offset, bytes


def _encode(values: tuple[Any, ...]) -> tuple[list[int], list[torch.Tensor]]:
    """The header (length, then kind, dtype, ndim, dims per item) and the items as tensors."""
    header: list[int] = [len(values)]
    items: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor) and v.dtype in _DTYPE_CODE:
            t = v.detach().to("cpu")
            if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                    memory_format=torch.channels_last):  # as it is: no transpose either end
                header += [_CHANNELS_LAST, _DTYPE_CODE[t.dtype], 4, *t.shape]
                t = t.permute(0, 2, 3, 1)
            else:
                t = t.contiguous()
                header += [_TENSOR, _DTYPE_CODE[t.dtype], t.dim(), *t.shape]
        else:
            t = torch.frombuffer(bytearray(pickle.dumps(v)), dtype=torch.uint8)
            header += [_OBJECT, _DTYPE_CODE[torch.uint8], 1, t.numel()]
        items.append(t)
    return header, items


def _spans(header: list[int]) -> tuple[list[Span], int]:
    """Where each item of a frame sits, and the frame's size in bytes."""
    spans: list[Span] = []
    i, off = 1, _FLAG
    for _ in range(header[0]):
        kind, dtype, ndim = header[i], _DTYPES[header[i + 1]], header[i + 2]
        shape = header[i + 3 : i + 3 + ndim]
        i += 3 + ndim
        nbytes = math.prod(shape) * dtype.itemsize
        spans.append((kind, dtype, shape, off, nbytes))
        off += -(-nbytes // _FLAG) * _FLAG
    return spans, off


def _pack(items: list[torch.Tensor], spans: list[Span], size: int) -> torch.Tensor:
    frame = torch.empty(size, dtype=torch.uint8)
    frame[:_FLAG].view(torch.int64).zero_()
    for t, (_, _, _, off, nbytes) in zip(items, spans, strict=True):
        if nbytes:
            frame[off : off + nbytes].copy_(t.reshape(-1).view(torch.uint8))
    return frame


def _flag(frame: torch.Tensor) -> int:
    return int(frame[:_FLAG].view(torch.int64).item())


def _unpack(frame: torch.Tensor, spans: list[Span]) -> tuple[Any, ...]:
    out: list[Any] = []
    for kind, dtype, shape, off, nbytes in spans:
        if kind == _CHANNELS_LAST:
            n, c, h, w = shape
            out.append(frame[off : off + nbytes].view(dtype).reshape(n, h, w, c)
                       .permute(0, 3, 1, 2))
            continue
        t = frame[off : off + nbytes].view(dtype).reshape(shape)
        out.append(t if kind == _TENSOR else pickle.loads(t.numpy().tobytes()))
    return tuple(out)


class _LayoutOut:
    """The sending end of a layout: what to transmit for a tuple, in order."""

    def __init__(self) -> None:
        self.header: list[int] | None = None
        self.size = _FLAG  # of the frame the other end has posted (or will post) next

    def frames(self, values: tuple[Any, ...]) -> list[torch.Tensor]:
        """The tuple's frame; when its layout changed, after the frame the other end expects,
        flagged with the new header's length, and the header."""
        header, items = _encode(values)
        spans, size = _spans(header)
        out = [_pack(items, spans, size)]
        if header != self.header:
            notice = torch.zeros(self.size, dtype=torch.uint8)
            notice[:_FLAG].view(torch.int64).fill_(len(header))
            out[:0] = [notice, torch.tensor(header, dtype=torch.int64)]
            self.header, self.size = header, size
        return out


class _LayoutIn:
    """The receiving end of a layout: a frame of the expected size, read in the kept layout
    or, when flagged, followed by a new header and the frame in that layout."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.size = _FLAG

    def read(self, frame: torch.Tensor,
             fetch: Callable[[torch.Tensor], None]) -> tuple[Any, ...]:
        n = _flag(frame)
        if n:
            h = torch.empty(n, dtype=torch.int64)
            fetch(h)
            self.spans, self.size = _spans(h.tolist())
            frame = torch.empty(self.size, dtype=torch.uint8)
            fetch(frame)
        return _unpack(frame, self.spans)


class TupleSender:
    """Sends tuples to one peer without blocking: a send returns once its messages are posted,
    and the stage computes the next micro-batch while they travel. Each send first waits for
    the previous one; `wait` waits for the last."""

    def __init__(self, dst: int) -> None:
        self.dst = dst
        self.layout = _LayoutOut()
        self.pending: list[tuple[Any, torch.Tensor]] = []  # (work, buffer it sends)

    def send(self, values: tuple[Any, ...]) -> None:
        frames = self.layout.frames(values)
        self.wait()
        for buf in frames:
            self.pending.append((dist.isend(buf, self.dst), buf))

    def wait(self) -> None:
        while self.pending:
            work, _ = self.pending.pop(0)
            work.wait()


class TupleReceiver:
    """Receives the tuples of a `TupleSender`. `recv(ahead=True)` posts the receive of the
    next tuple before returning, in the layout of this one."""

    def __init__(self, src: int) -> None:
        self.src = src
        self.layout = _LayoutIn()
        self.posted: tuple[Any, torch.Tensor] | None = None

    def _post(self) -> None:
        frame = torch.empty(self.layout.size, dtype=torch.uint8)
        self.posted = (dist.irecv(frame, self.src), frame)

    def recv(self, ahead: bool = False) -> tuple[Any, ...]:
        if self.posted is None:
            self._post()
        assert self.posted is not None
        work, frame = self.posted
        self.posted = None
        work.wait()
        out = self.layout.read(frame, lambda t: dist.recv(t, self.src))
        if ahead:
            self._post()
        return out


class TupleBroadcast:
    """Shares the tuples that rank `src` of a tensor-parallel group receives with the group's
    other ranks: one broadcast per tuple while the layout holds, as over a hop."""

    def __init__(self, src: int, group: Any) -> None:
        self.src, self.group = src, group
        self.out, self.into = _LayoutOut(), _LayoutIn()

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, self.src, group=self.group)

    def share(self, values: tuple[Any, ...] | None) -> tuple[Any, ...]:
        """`values` on `src`, None on the other ranks: the tuple, on every rank."""
        if values is not None:
            for buf in self.out.frames(values):
                self._broadcast(buf)
            return tuple(values)
        frame = torch.empty(self.into.size, dtype=torch.uint8)
        self._broadcast(frame)
        return self.into.read(frame, self._broadcast)
