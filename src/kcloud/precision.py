"""Numeric precisions and their storage sizes."""

from __future__ import annotations

from enum import StrEnum

from kcloud.errors import KCloudError


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def bytes(self) -> float:
        return _BYTES[self]

    @classmethod
    def parse(cls, text: str) -> Precision:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise KCloudError(f"unknown precision '{text}'", f"use one of: {names}") from None


_BYTES = {
    Precision.FP32: 4.0,
    Precision.BF16: 2.0,
    Precision.FP16: 2.0,
    Precision.FP8: 1.0,
    Precision.INT8: 1.0,
    Precision.INT4: 0.5,
}

# When a device lacks a precision, the nearest one it has that loses nothing is used instead, in
# this order. FP8 carries int8-quantized values; int8 cannot carry FP8's range, so FP8 falls
# back to a 16-bit float.
FALLBACK: dict[Precision, tuple[Precision, ...]] = {
    Precision.INT4: (Precision.INT8, Precision.FP8, Precision.FP16, Precision.BF16),
    Precision.INT8: (Precision.FP8, Precision.FP16, Precision.BF16),
    Precision.FP8: (Precision.FP16, Precision.BF16),
    Precision.FP16: (Precision.BF16,),
    Precision.BF16: (Precision.FP16,),
    Precision.FP32: (),
}
