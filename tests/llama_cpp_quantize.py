"""Run llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) on a GGUF file.

Run with a Python that has llama_cpp (/tmp/lcpvenv/bin/python), not the project's: it imports only
llama_cpp, numpy and the standard library.
usage: llama_cpp_quantize.py IN OUT FTYPE_NUMBER [--pure] [--imatrix FILE.dat]
The imatrix is read as llama-quantize reads a legacy .dat file (values / ncall).
"""

from __future__ import annotations

import argparse
import ctypes
import struct
import sys

import llama_cpp
import numpy as np


def read_dat(path: str) -> dict[str, np.ndarray]:
    data = open(path, "rb").read()
    (n,) = struct.unpack_from("<i", data, 0)
    pos, out = 4, {}
    for _ in range(n):
        (length,) = struct.unpack_from("<i", data, pos)
        name = data[pos + 4 : pos + 4 + length].decode()
        pos += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, pos)
        pos += 8
        values = np.frombuffer(data, np.float32, nval, pos).copy()
        pos += 4 * nval
        out[name] = values / ncall if ncall > 0 else values
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("ftype", type=int)
    ap.add_argument("--pure", action="store_true")
    ap.add_argument("--imatrix")
    a = ap.parse_args()
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = a.ftype
    p.nthread = 2
    p.pure = a.pure
    keep = []
    if a.imatrix:
        entries = read_dat(a.imatrix)
        arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(sorted(entries.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append((name.encode(), values))
            arr[i].name = keep[-1][0]
            arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = values.size
        p.imatrix = ctypes.cast(arr, type(p.imatrix))
    return int(llama_cpp.llama_model_quantize(a.src.encode(), a.dst.encode(), ctypes.byref(p)))


if __name__ == "__main__":
    sys.exit(main())
