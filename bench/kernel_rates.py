"""The yardstick for engine speed: the same 2048x2048 product on this CPU's kernels, then the
voice's own shapes (text side and decoder), then the kernel path ttsd's engine chooses on this box
for each class of product of a real voice, with every candidate's rate, in one run.

Which kernel is fastest depends on the CPU: on AMD EPYC, MKL's fp32 GEMM was measured at half of
oneDNN's and ONNX Runtime's rate; on an Intel Xeon with AMX (amx_bf16) MKL runs at full rate and bf16
runs about 6x fp32. Print the CPU's flags that matter and GFLOP/s per kernel (2 threads, best of 10)
before deciding where an engine's arithmetic should run::

    .venv/bin/python bench/kernel_rates.py [--voice FOLDER]

``--jax PYTHON``: also the 2048² product on JAX (XLA), fp32 and bf16, run by ``PYTHON``, the
interpreter of a venv of its own (``python3 -m venv /tmp/jax && /tmp/jax/bin/pip install jax``): a
second library for bf16, whose only other kernel here is oneDNN's.

``--voice``: a converted voice folder (default: the built-in voice from the cache, converted first
if needed). Its choice is measured as the engine measures it at load (``ttsd.engines.vits.kernels``),
on 1 thread (the daemon's loader) and on 2, in fp32 and, where the CPU has it, bf16.
"""

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np
import torch


def engine_choice(folder: Path) -> None:
    """What ttsd's engine would choose here for ``folder``'s products, and every candidate's rate."""
    from ttsd.engines.precision import native_bf16
    from ttsd.engines.vits import kernels
    from ttsd.engines.vits.model import NativeVits

    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16() else [])
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for dtype in dtypes:
            model = NativeVits(folder, dtype=dtype)
            for kind, (items, class_dtype) in kernels.classes(model).items():
                choice = kernels.measure(items, class_dtype, kernels.ROWS[kind])
                rates = ", ".join(f"{p} {r:.0f}" for p, r in choice.rates.items())
                refused = "".join(f"; {p} refused: {why}" for p, why in choice.refused.items())
                print(f"engine choice, {threads} thread(s), {'bf16' if dtype == torch.bfloat16 else 'fp32'} voice, "
                      f"{kind} ({str(class_dtype).removeprefix('torch.')}): {choice.path} "
                      f"({rates} GF/s{refused})")


JAX_PRODUCT = """
import sys, time
import jax, jax.numpy as jnp
n = int(sys.argv[1])
for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    a = jnp.ones((n, n), dtype); b = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = 1e9
    for _ in range(10):
        started = time.perf_counter(); f(a, b).block_until_ready(); best = min(best, time.perf_counter() - started)
    print(f"JAX {jax.__version__} (XLA) {name} dot {2 * n**3 / best / 1e9:.0f} GF/s", flush=True)
"""


def jax_rates(python: str, n: int) -> None:
    """The same product on JAX (XLA's CPU backend), a second library for bf16, run by ``python``:
    an interpreter of its own venv (``pip install jax``), so that JAX's pins stay out of ttsd's."""
    try:
        run = subprocess.run([python, "-c", JAX_PRODUCT, str(n)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"JAX: not timed ({exc})")
        return
    lines = [line for line in run.stdout.splitlines() if line.startswith("JAX")]
    why = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    print("\n".join(lines) if run.returncode == 0 and lines else f"JAX: not timed ({why[-200:]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voice", type=Path, help="a converted voice folder (default: the built-in voice)")
    parser.add_argument("--jax", metavar="PYTHON",
                        help="also time the product on JAX, run by this interpreter (a venv with jax installed)")
    args = parser.parse_args()
    from ttsd.testing import cpu_name

    print(cpu_name())
    torch.set_num_threads(2)
    def best(fn, n=10):
        fn(); b=1e9
        for _ in range(n):
            t=time.perf_counter(); fn(); b=min(b, time.perf_counter()-t)
        return b
    N=2048; fl=2*N**3/1e9
    a=torch.randn(N,N); b=torch.randn(N,N)
    print("torch fp32 mm (MKL)", round(fl/best(lambda: a@b)), "GF/s")
    from ttsd.engines.precision import native_bf16

    # Without native bf16 (an AVX2-only CPU) oneDNN emulates it, or refuses it (its convolution):
    # a 2048^2 product took minutes on an AMD EPYC family 25 with AVX2 only, and says nothing.
    bf16 = native_bf16()
    print("native bf16:", bf16 or "none (bf16 kernels not timed)")
    if bf16:
        ab=a.bfloat16(); bb=b.bfloat16()
        print("torch bf16 mm (oneDNN)", round(fl/best(lambda: ab@bb)), "GF/s")
    x4=a[None,:,None,:].contiguous(memory_format=torch.channels_last)  # (1,2048,1,2048)
    w4=b[:,:,None,None].contiguous(memory_format=torch.channels_last)
    print("torch fp32 1x1 conv CL (oneDNN)", round(fl/best(lambda: torch.ops.mkldnn._convolution_pointwise(x4, w4, None, [0,0],[1,1],[1,1],1,"none",[],""))), "GF/s")
    print("torch fp32 linear_pointwise", round(fl/best(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))), "GF/s")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMul", ["A","B"], ["C"])], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [N,N]), helper.make_tensor_value_info("B", TensorProto.FLOAT, [N,N])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [N,N])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]); m.ir_version = 8
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    an, bn = a.numpy(), b.numpy()
    print("ORT fp32 MatMul (MLAS)", round(fl/best(lambda: s.run(None, {"A": an, "B": bn}))), "GF/s")
    print("numpy", np.__version__, "matmul", round(fl/best(lambda: an@bn)), "GF/s")
    if args.jax:
        jax_rates(args.jax, N)

    # The voice's own shapes (en_US-joe-medium, ~190 tokens, ~380 frames, decoder windows of 256
    # frames): the text side's matrix products on MKL and on oneDNN, and the decoder's channels-last
    # convolutions in fp32 and bf16 (oneDNN, fused leaky ReLU) and in fp32 on MKL, best of 30.
    for m_, k_, n_, what in ((192, 576, 768, "encoder ff1"), (192, 2304, 192, "encoder ff2"),
                             (384, 960, 384, "flow in-layer")):
        x, w, bias = torch.randn(m_, k_), torch.randn(k_, n_), torch.randn(n_)
        wt, f = w.t().contiguous(), 2 * m_ * k_ * n_ / 1e9
        mkl = f / best(lambda: torch.addmm(bias, x, w), 30)
        dnn = f / best(lambda: torch.ops.mkldnn._linear_pointwise(x, wt, bias, "none", [], ""), 30)
        print(f"{what} {m_}x{k_}x{n_}: MKL addmm {mkl:.0f}, oneDNN linear {dnn:.0f} GF/s")
    for c, length, k, d in ((128, 2048, 7, 3), (64, 16384, 7, 3), (32, 65536, 3, 1), (32, 65536, 7, 3)):
        rates = []
        for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
            x = torch.randn(1, c, 1, length).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(c, c, 1, k).to(dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.randn(c).to(dtype)
            conv = lambda: torch.ops.mkldnn._convolution_pointwise(  # noqa: E731
                x, w, bias, [0, (k - 1) * d // 2], [1, 1], [1, d], 1, "leaky_relu", [0.1], "")
            rates.append(2 * c * c * k * length / 1e9 / best(conv, 30))
        # The same convolution on MKL, which builds nothing per length (oneDNN does): time-major
        # rows, one product per tap over a shifted view of a zero-padded input.
        pad = (k - 1) * d // 2
        xt = torch.zeros(length + 2 * pad, c)
        xt[pad:pad + length] = torch.randn(length, c)
        taps = [torch.randn(c, c) for _ in range(k)]
        out, bias = torch.empty(length, c), torch.randn(c)

        def per_tap() -> None:
            torch.addmm(bias, xt[:length], taps[0], out=out)
            for j in range(1, k):
                out.addmm_(xt[j * d:j * d + length], taps[j])

        mkl = 2 * c * c * k * length / 1e9 / best(per_tap, 30)
        print(f"decoder conv {c} ch, k={k} d={d}, {length} samples: fp32 {rates[0]:.0f}"
              + (f", bf16 {rates[1]:.0f}" if bf16 else "") + f" GF/s (oneDNN); fp32 MKL per tap {mkl:.0f} GF/s")
    if args.voice is None:
        from ttsd.config import default_cache_dir
        from ttsd.voices import builtin_model

        args.voice = builtin_model(default_cache_dir())
    engine_choice(args.voice)


if __name__ == "__main__":
    main()
