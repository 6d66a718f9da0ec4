"""The package's CUDA kernels and their CuPy host code, run on the CPU (tests on machines without a GPU).

:func:`compile_source` builds a ``.cu`` file with ``emulator.h`` (g++, C++20) into a shared library in which
every thread of every block runs, so the kernels' indexing, loop tails, warp shuffles and block reductions are
checked against the NumPy references here; speed is not. :func:`fake_cupy` is a NumPy-backed stand-in for the
part of CuPy that ``gpu_insar_adjust.kernels.cuda`` uses, with ``RawModule`` compiled by :func:`compile_source`
and launches that check every argument against the kernel's C signature (a Python int or a float32 array where
the kernel takes ``long long`` or ``double*`` is an error here, as it would be a silent misread on the device).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_CACHE = Path(tempfile.gettempdir()) / "gia-cuda-emulator"

_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+'
                        r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)", re.S)
_SCALARS = {"int": np.int32, "long long": np.int64, "double": np.float64, "float": np.float32,
            "unsigned int": np.uint32}
_POINTEES = {"float": np.float32, "double": np.float64, "unsigned char": np.uint8, "long long": np.int64,
             "unsigned": np.uint32, "unsigned int": np.uint32,
             "int": np.int32}


def available() -> str | None:
    """None when kernels can be emulated here, else the reason they cannot."""
    if shutil.which("g++") is None:
        return "g++ not installed"
    probe = "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text(probe)
        proc = subprocess.run(["g++", "-std=c++20", "-pthread", str(src), "-o", str(Path(d) / "probe")],
                              capture_output=True, text=True)
    return None if proc.returncode == 0 else "g++ lacks C++20 std::barrier"


def _strip_comments(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    return re.sub(r"//[^\n]*", " ", code)


def kernel_signatures(code: str) -> dict[str, list[tuple[str, str]]]:
    """``{kernel: [(C type, parameter name), ...]}`` of the ``extern "C" __global__`` functions in ``code``."""
    out = {}
    for name, params in _KERNEL_RE.findall(_strip_comments(code)):
        sig = []
        for p in params.split(","):
            p = " ".join(p.replace("__restrict__", " ").split())
            m = re.fullmatch(r"(.+?)\s*(\w+)", p)
            sig.append((m.group(1).replace(" *", "*"), m.group(2)))
        out[name] = sig
    return out


class EmulatedModule:
    """A compiled ``.cu`` source: ``get_function(name)(grid, block, args)`` as with ``cupy.RawModule``."""

    def __init__(self, code: str, defines: tuple[str, ...] = ()):
        self.signatures = kernel_signatures(code)
        if not self.signatures:
            raise ValueError('no extern "C" __global__ kernel in the source')
        lines = ['#include "emulator.h"', code, ""]
        for name, sig in self.signatures.items():
            args = ", ".join(f"*({t}*)argv[{i}]" for i, (t, _) in enumerate(sig))
            lines.append(f'extern "C" void gia_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, '
                         f"unsigned by, unsigned bz, void** argv) {{ gia_emu::launch(dim3(gx, gy, gz), "
                         f"dim3(bx, by, bz), [&] {{ {name}({args}); }}); }}")
        wrapper = "\n".join(lines)
        key = hashlib.sha256((wrapper + "\0".join(defines) + (HERE / "emulator.h").read_text()).encode())
        lib = _CACHE / f"{key.hexdigest()[:24]}.so"
        if not lib.exists():
            _CACHE.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=_CACHE) as d:
                src = Path(d) / "module.cpp"
                src.write_text(wrapper)
                tmp = Path(d) / "module.so"
                proc = subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                                       "-Wno-unknown-pragmas", f"-I{HERE}", *(f"-D{d_}" for d_ in defines),
                                       str(src), "-o", str(tmp)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"emulated CUDA build failed:\n{proc.stderr}")
                tmp.replace(lib)  # atomic: parallel test workers may build the same module
        self._lib = ctypes.CDLL(str(lib))

    def get_function(self, name: str):
        sig = self.signatures[name]
        launch = getattr(self._lib, f"gia_launch_{name}")
        launch.restype = None

        def call(grid, block, args):
            grid = tuple(grid) + (1,) * (3 - len(grid))
            block = tuple(block) + (1,) * (3 - len(block))
            if len(args) != len(sig):
                raise TypeError(f"{name}: {len(args)} arguments for {len(sig)} parameters")
            holders = []
            for a, (ctype, pname) in zip(args, sig):
                holders.append(_pack(name, pname, ctype, a))
            argv = (ctypes.c_void_p * len(holders))(*(ctypes.addressof(h) for h in holders))
            launch(*(ctypes.c_uint(int(g)) for g in grid), *(ctypes.c_uint(int(b)) for b in block), argv)

        return call


def _pack(kernel, pname, ctype, a):
    where = f"{kernel}({pname}: {ctype})"
    if ctype.endswith("*"):
        pointee = ctype[:-1].replace("const ", "").strip()
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{where}: an array is needed, got {type(a).__name__}")
        if a.dtype != _POINTEES[pointee]:
            raise TypeError(f"{where}: array of {a.dtype}, the kernel reads {pointee}")
        if not a.flags.c_contiguous:
            raise TypeError(f"{where}: array is not C-contiguous")
        return ctypes.c_void_p(a.ctypes.data)
    base = ctype.replace("const ", "").strip()
    want = _SCALARS[base]
    if type(a) is not want:
        raise TypeError(f"{where}: pass numpy.{np.dtype(want).name}, got {type(a).__name__}")
    return np.ctypeslib.as_ctypes_type(np.dtype(want))(a)


# ---------------------------------------------------------------- a NumPy-backed CuPy for kernels/cuda.py -----
class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy one (``.get()`` copies it to the host)."""

    def get(self):
        return np.array(self, copy=True).view(np.ndarray)


def _dev(a):
    return a.view(DeviceArray) if isinstance(a, np.ndarray) else np.asarray(a).view(DeviceArray)


def fake_cupy(n_multiprocessors: int = 2) -> types.ModuleType:
    """A module named ``cupy`` for ``gpu_insar_adjust.kernels.cuda``: arrays are :class:`DeviceArray`,
    ``RawModule`` is an :class:`EmulatedModule`, the device has ``n_multiprocessors`` multiprocessors, and
    ``cupy.launches`` lists the kernels launched."""
    cp = types.ModuleType("cupy")
    for name in ("float32", "float64", "uint8", "int32", "int64", "nan"):
        setattr(cp, name, getattr(np, name))

    def wrap(f):
        return lambda *a, **k: _dev(f(*a, **k))

    for name in ("empty", "zeros", "ones", "empty_like", "zeros_like", "where", "stack", "concatenate", "arange",
                 "meshgrid", "argmax", "all"):
        setattr(cp, name, wrap(getattr(np, name)))
    cp.asarray = lambda a, dtype=None: _dev(np.array(a, dtype=dtype, copy=True))
    cp.ascontiguousarray = lambda a, dtype=None: _dev(np.ascontiguousarray(a, dtype=dtype))
    cp.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)
    cp.copyto = np.copyto
    cp.ndarray = DeviceArray

    class RawModule:
        def __init__(self, code, options=()):
            defines = tuple(o[2:] for o in options if o.startswith("-D"))
            self._mod = EmulatedModule(code, defines)

        def get_function(self, name):
            fn = self._mod.get_function(name)

            def launch(grid, block, args):
                cp.launches.append(name)
                fn(grid, block, args)

            return launch

    cp.RawModule = RawModule
    cp.launches = []  # names of the kernels launched, in order

    class Device:
        attributes = {"MultiProcessorCount": n_multiprocessors}

    cp.cuda = types.SimpleNamespace(Device=Device)
    return cp
