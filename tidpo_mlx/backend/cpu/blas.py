"""Fast BLAS for MLX's Linux CPU backend, loaded before the first ``import mlx``.

MLX's Linux CPU wheel links a slow reference BLAS. The PyPI wheel
``cmeel-openblas`` ships OpenBLAS; loaded into the global symbol scope
(``RTLD_GLOBAL``) before MLX, its ``cblas_sgemm`` wins symbol resolution and
matmuls run many times faster (``tidpo-mlx doctor`` measures it; numbers in
``benchmarks/RESULTS.md``). Loaded after MLX it does nothing, so this module
must not import mlx and :func:`preload` runs from ``tidpo_mlx.setup()``
(``backend.tune_process``), which the CLI, the benchmarks and the tests call
before anything imports mlx.

That OpenBLAS build needs ``libgfortran.so.5``. Where the system has none, the
copy that ``mlx[cpu]`` (or numpy, or scipy) bundles is used: auditwheel
renamed its SONAME, so a copy with the SONAME set back to
``libgfortran.so.5`` is written once to the user cache and loaded first.

Set ``TIDPO_MLX_NO_OPENBLAS=1`` to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import struct
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

OPT_OUT_ENV = "TIDPO_MLX_NO_OPENBLAS"


@dataclass
class BlasStatus:
    """What :func:`preload` did, for ``tidpo-mlx doctor`` and the logs."""

    state: str
    detail: str = ""


STATUS = BlasStatus("not attempted")


def _site_dirs() -> list[Path]:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    dirs.update(p for p in sys.path if p.endswith("site-packages"))
    return [Path(d) for d in sorted(dirs) if Path(d).is_dir()]


def _find(pattern: str) -> Path | None:
    for site in _site_dirs():
        hits = sorted(glob.glob(str(site / pattern)))
        if hits:
            return Path(hits[0])
    return None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(root) / "tidpo-mlx" / "blas"


def set_soname(data: bytes, new_soname: str) -> bytes:
    """Return an ELF64 little-endian shared object with its DT_SONAME rewritten.

    The new name must not be longer than the old one: it is written in place in
    the dynamic string table and padded with NUL bytes.
    """
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    headers = [
        struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)
    ]
    dynamic = next(h for h in headers if h[0] == 2)

    def file_offset(vaddr: int) -> int:
        for p_type, _, offset, va, _, filesz, _, _ in headers:
            if p_type == 1 and va <= vaddr < va + filesz:
                return vaddr - va + offset
        raise ValueError(f"address {vaddr:#x} is in no loadable segment")

    strtab = soname = None
    pos = dynamic[2]
    while True:
        tag, value = struct.unpack_from("<qQ", data, pos)
        pos += 16
        if tag == 0:
            break
        if tag == 5:
            strtab = value
        elif tag == 14:
            soname = value
    if strtab is None or soname is None:
        raise ValueError("no DT_SONAME in the dynamic section")
    start = file_offset(strtab) + soname
    end = data.index(b"\0", start)
    encoded = new_soname.encode()
    if len(encoded) > end - start:
        raise ValueError("new SONAME is longer than the old one")
    out = bytearray(data)
    out[start:end] = encoded + b"\0" * (end - start - len(encoded))
    return bytes(out)


def _load_gfortran() -> str:
    """Make ``libgfortran.so.5`` resolvable; return where it came from."""
    if ctypes.util.find_library("gfortran"):
        return "system libgfortran"
    for libs in ("mlx_cpu.libs", "numpy.libs", "scipy.libs"):
        bundled = _find(f"{libs}/libgfortran-*.so*")
        quadmath = _find(f"{libs}/libquadmath-*.so*")
        if bundled is None:
            continue
        if quadmath is not None:
            ctypes.CDLL(str(quadmath), mode=ctypes.RTLD_GLOBAL)
        target = _cache_dir() / f"libgfortran.so.5-{bundled.name}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(set_soname(bundled.read_bytes(), "libgfortran.so.5"))
            os.replace(tmp, target)
        ctypes.CDLL(str(target), mode=ctypes.RTLD_GLOBAL)
        return f"libgfortran from {libs}"
    raise OSError("no libgfortran.so.5 found (system or bundled in a wheel)")


def preload() -> BlasStatus:
    """Load cmeel-openblas globally before MLX, once; never raises.

    Returns the status, also kept in :data:`STATUS`. A warning is issued when
    MLX was imported before this ran (the fast BLAS then cannot take effect).
    """
    global STATUS
    if STATUS.state != "not attempted":
        return STATUS
    if not sys.platform.startswith("linux"):
        STATUS = BlasStatus("not needed", "MLX uses Accelerate on macOS")
    elif os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        STATUS = BlasStatus("disabled", f"{OPT_OUT_ENV} is set")
    elif "mlx.core" in sys.modules:
        STATUS = BlasStatus("too late", "mlx was imported before tidpo_mlx.setup()")
        warnings.warn(
            "tidpo_mlx: mlx was imported before tidpo_mlx.setup(), so the fast OpenBLAS "
            "could not be loaded and CPU matmuls run on MLX's slow reference BLAS. "
            "Call tidpo_mlx.setup() first, before anything imports mlx.",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        lib = _find("cmeel.prefix/lib/libopenblas.so.0")
        if lib is None:
            STATUS = BlasStatus("missing", "pip install cmeel-openblas")
        else:
            try:
                origin = _load_gfortran()
                build, missing = _build_target(lib)
                if missing:
                    STATUS = BlasStatus("unusable", f"{lib} is built for {build} only, which needs {missing}; this CPU "
                                        f"lacks that: {REINSTALL} (MLX's reference BLAS is used meanwhile)")
                    warnings.warn(f"tidpo_mlx: {STATUS.detail}", RuntimeWarning, stacklevel=3)
                else:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                    STATUS = BlasStatus("openblas", f"{lib} ({build}; {origin})")
            except OSError as err:
                STATUS = BlasStatus("failed", str(err))
    return STATUS


NEEDS = {
    "SKYLAKEX": ("avx512f", "avx512bw"), "COOPERLAKE": ("avx512f", "avx512_bf16"),
    "SAPPHIRERAPIDS": ("avx512f", "amx_tile"), "ZEN": ("avx2", "fma"), "HASWELL": ("avx2", "fma"),
}
"""CPU flags (``/proc/cpuinfo``) each single-target OpenBLAS build needs; cmeel-openblas wheels are built
for one target each (0.3.31: SKYLAKEX, 0.3.29: ZEN), not for all (``DYNAMIC_ARCH``)."""
REINSTALL = "pip install 'cmeel-openblas==0.3.29' (built for ZEN: any AVX2 CPU)"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build_target(lib: Path) -> tuple[str, str]:
    """The OpenBLAS build's target core and the CPU flags it needs that this CPU lacks ("" if none).

    Asks the library itself, loaded locally (its symbols stay out of MLX's
    reach until :func:`preload` loads it globally); running a kernel of a
    target the CPU lacks would kill the process (SIGILL).
    """
    local = ctypes.CDLL(str(lib), mode=ctypes.RTLD_LOCAL)
    config = local.openblas_get_config
    config.restype = ctypes.c_char_p
    words = (config() or b"").decode(errors="replace").split()
    if "DYNAMIC_ARCH" in words:
        return "DYNAMIC_ARCH", ""
    target = next((w for w in words[2:] if w.upper() in NEEDS), words[3] if len(words) > 3 else "unknown")
    return target, lacking(target, _cpu_flags())


def lacking(target: str, flags: set[str]) -> str:
    """The flags of :data:`NEEDS` for ``target`` missing from ``flags`` ("" if none, or flags unknown)."""
    return " and ".join(f for f in NEEDS.get(target.upper(), ()) if f not in flags) if flags else ""
