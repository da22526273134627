# The same layers through the module, then with a trial fast path for F.linear in QuantizedTensor.__torch_function__
# (the cached decode plan called at once), then the plan alone: how much of the call is torch's own dispatch.
# usage, from the repo root: .venv/bin/python benchmarks/results/avx2_zen2/scratch/torch_function_fast_path.py
import time, statistics, torch, torch.nn as nn, torch.nn.functional as F, lowbit
torch.set_num_threads(2)
from lowbit.configs.int8 import Int8WeightOnlyConfig
from lowbit.configs.float8 import Float8WeightOnlyConfig
from lowbit.tensors import base
from lowbit.tensors.base import QuantizedTensor, _PLAN
def t(f, n=3000):
    f(); ts=[]
    for _ in range(9):
        t0=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t0)/n)
    return statistics.median(ts)*1e6
x = torch.randn(1,576,dtype=torch.bfloat16)
lins = {}
for name, cfg in (("int8wo", Int8WeightOnlyConfig()), ("fp8wo", Float8WeightOnlyConfig())):
    torch.manual_seed(0)
    lin = nn.Linear(576,192,bias=False,dtype=torch.bfloat16); lowbit.quantize_(lin, cfg); lins[name] = lin
with torch.no_grad():
    for name, lin in lins.items(): print(name, "before", f"{t(lambda: lin(x)):.1f}")
    orig = QuantizedTensor.__torch_function__.__func__
    linear = F.linear
    def fast(cls, func, types, args=(), kwargs=None):
        if func is linear and len(args) == 2 and not kwargs:
            x, w = args
            plan = w.__dict__.get(_PLAN)
            if plan is not None and type(x) is torch.Tensor and x.dim() == 2:
                out = plan(x, None)
                if out is not None:
                    return out
        return orig(cls, func, types, args, kwargs)
    QuantizedTensor.__torch_function__ = classmethod(fast)
    for name, lin in lins.items(): print(name, "fast", f"{t(lambda: lin(x)):.1f}")
    w = lins["int8wo"].weight
    print("plan direct", f"{t(lambda: w.__dict__[_PLAN](x, None)):.1f}")
