"""The course's own CPU kernels (chapter 02): compiled once, on first use.

`quantized_matmul.cpp` (beside this file) holds three loops that read each quantized
weight byte once — INT8 weights × float32 activations, INT8 × INT8 with int32 sums, and 4-bit
weights × float32 activations — and, for prefill, INT8 weights converted block by block in the
cache for torch's float32 GEMM; they are registered as `torch.ops.course_kernels.*`.
`fused_decode.cpp` runs one decoded token through every layer of a Llama-family model in one call
(`torch.classes.course_kernels.DecodeStep`, which `course_lib.decoder` builds). Both are compiled
for the machine at hand (g++ -O3 -march=native, about a minute, once) into the course cache.

`available()` says whether they are there; without a C++ compiler (or with COURSE_KERNELS=off) the
INT8 layers use plain torch operations and the decoder runs op by op instead: the same numbers, more slowly.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

import torch

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))  # compiled together, with the header beside them
HEADERS = sorted(Path(__file__).parent.glob("*.h"))


def _machine_key() -> str:
    """Source, torch, Python and CPU features: a build made for one of them never loads on another."""
    flags = ""
    if Path("/proc/cpuinfo").is_file():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    parts = [*(path.read_text() for path in SOURCES + HEADERS), torch.__version__, sys.version, platform.machine(), flags]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _compile(out: Path) -> None:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    command = [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in cpp_extension.include_paths()], f"-I{sysconfig.get_paths()['include']}",
               *map(str, SOURCES), "-o", str(out), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", "-ltorch",
               f"-Wl,-rpath,{torch_lib}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])


@cache  # the compiled library, loaded once per process like an import
def available() -> bool:
    """True when `torch.ops.course_kernels` is loaded: built now (once per machine) or from the cache."""
    if os.environ.get("COURSE_KERNELS", "on").lower() in ("off", "0", "false") or platform.system() == "Windows":
        return False
    from ..runtime import cache_dir

    folder = cache_dir() / "kernels" / f"course_kernels-{_machine_key()}"
    library = folder / "course_kernels.so"
    if not library.is_file():
        print("[course_lib] compiling the course's INT8/INT4 CPU kernels (once for this machine, about a minute)",
              file=sys.stderr, flush=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
        try:
            _compile(tmp / "course_kernels.so")
            os.replace(tmp, folder)  # atomic: the cache holds a whole build or none
        except OSError:
            if not library.is_file():  # not a concurrent build that got there first
                raise
        except Exception as error:  # no compiler, or one that fails: plain torch operations instead
            print(f"[course_lib] could not compile the CPU kernels; using plain torch operations "
                  f"(same numbers, slower): {str(error).strip().splitlines()[-1:]}", file=sys.stderr, flush=True)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    torch.ops.load_library(str(library))
    return True


def _cpu_flags() -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (x86 "flags", ARM "Features"); empty elsewhere."""
    if not Path("/proc/cpuinfo").is_file():
        return set()
    with open("/proc/cpuinfo") as info:  # the first CPU's line is enough: read no further
        return next((set(line.split(":", 1)[1].split()) for line in info
                     if line.startswith(("flags", "Features"))), set())


def cpu_has_int8_dot_products() -> bool:
    """True when this CPU multiplies INT8 pairs and sums them in one instruction (AVX-512 VNNI or
    AVX-VNNI on x86, the dot-product extension on ARM): INT8 matrix products then beat FP32 ones.
    With AVX2 alone they do not (torch's INT8 GEMM ran at 0.03–0.04× FP32 on such a CPU)."""
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"})


def cpu_has_bf16_matmul() -> bool:
    """True when this x86 CPU multiplies bfloat16 in hardware (AVX-512 BF16, or AMX tiles): oneDNN's
    bfloat16 matrix products then run several times faster than float32 ones (3–5× at the course
    model's shapes on the AMX CPU the course is measured on). Without them bfloat16 is emulated, slower."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


# ----------------------------------------------------------------------------- the matmuls the layers call
# Each takes the compiled loops on a CPU with float32 activations, and plain torch operations
# otherwise (CUDA, other dtypes, no compiler). No argument checks here: the layers check once, when
# they are built (from_float, quantize_model).

FEW_ROWS = 16  # up to this many tokens the W8A8 and 4-bit loops win; above, torch's GEMMs do


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


def int8_weight_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: x [M, K] (float) @ (q · scale)ᵀ with q int8 [N, K] and float32 scale [N, 1] or [],
    computed in x's dtype (the INT8 weights are converted to it on the fly): [M, N]. The compiled
    kernel reads each weight byte once for a few rows (decode) and converts blocks of rows in the
    cache for a float32 GEMM for many (prefill)."""
    if _fast(x):
        return torch.ops.course_kernels.int8_weight_matmul(x, q, scale)
    return torch.nn.functional.linear(x, q.to(x.dtype)) * scale.view(1, -1).to(x.dtype)


def int8_dynamic_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, int8_gemm: bool = True) -> torch.Tensor:
    """W8A8: every row of x [M, K] absmax-quantized to INT8, an INT8 × INT8 product with int32
    sums, dequantized by s_x ⊗ s_w: float32 [M, N] (whatever x's dtype).

    `int8_gemm=False` (a CPU without INT8 dot products, `cpu_has_int8_dot_products`): the same
    integer products are summed by the float32 GEMM instead — the same numbers while every partial
    sum stays below 2²⁴ in magnitude (127² · K would pass it only if all products were maximal),
    at FP32's speed instead of a far slower INT8 GEMM."""
    if _fast(x) and (int8_gemm or x.shape[0] <= FEW_ROWS):  # many rows: quantize, INT8 GEMM, dequantize in one call
        return torch.ops.course_kernels.int8_dynamic_matmul(x, q, scale)
    from ..quant import absmax_quantize_rows

    return dequantized_int8_product(*absmax_quantize_rows(x.float()), q, scale, int8_gemm)


def dequantized_int8_product(x_q: torch.Tensor, x_scale: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                             int8_gemm: bool = True) -> torch.Tensor:
    """(x_q · q_ᵀ) · (s_x ⊗ s_w) for INT8 rows x_q [M, K] with float32 scales x_scale [M, 1] and INT8
    weights q [N, K] with scale [N, 1] or []: float32 [M, N]. The INT8 GEMM (int32 sums) or, with
    `int8_gemm=False` on a CPU, the same integer products summed by the float32 GEMM (see
    `int8_dynamic_linear`). W8A8 and LLM.int8()'s INT8 columns both end here."""
    from ..quant import int8_matmul

    if int8_gemm or x_q.device.type != "cpu":
        return int8_matmul(x_q, q.t()).float().mul_(x_scale).mul_(scale.view(1, -1))
    return int8_weight_linear(x_q.float(), q, scale).mul_(x_scale)


def int4_weight_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """W4A16: x [M, K] (float) @ Wᵀ with W = (nibble − 8) · scale per group, two weights a byte
    (packed uint8 [N, K/2], float32 scale [N, K/group_size]), computed in x's dtype: [M, N]."""
    if _fast(x) and x.shape[0] <= FEW_ROWS:
        return torch.ops.course_kernels.int4_weight_matmul(x, packed, scale, group_size)
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2).to(x.dtype) - 8
    weight = (nibbles.unflatten(-1, (-1, group_size)) * scale.to(x.dtype)[..., None]).flatten(-2)
    return torch.nn.functional.linear(x, weight)
