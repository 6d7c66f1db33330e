"""The yardstick for engine speed: the same 2048x2048 product on this CPU's kernels, in one run.

Which kernel is fastest depends on the CPU: on AMD EPYC, MKL's fp32 GEMM was measured at half of
oneDNN's and ONNX Runtime's rate; on an Intel Xeon with AMX (amx_bf16) MKL runs at full rate and bf16
runs about 6x fp32. Print the CPU's flags that matter and GFLOP/s per kernel (2 threads, best of 10)
before deciding where an engine's arithmetic should run::

    .venv/bin/python bench/kernels.py
"""

import re
import time
from pathlib import Path

import numpy as np
import torch

flags = set(re.findall(r"\S+", next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                                       if line.startswith("flags")), "")))
model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")), "?")
print(model, "|", " ".join(sorted(f for f in flags if f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))))
torch.set_num_threads(2)
def best(fn, n=10):
    fn(); b=1e9
    for _ in range(n):
        t=time.perf_counter(); fn(); b=min(b, time.perf_counter()-t)
    return b
N=2048; fl=2*N**3/1e9
a=torch.randn(N,N); b=torch.randn(N,N)
print("torch fp32 mm (MKL)", round(fl/best(lambda: a@b)), "GF/s")
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
