# SmolLM2 (bf16) logits over 128 random-token positions: 8da4w g32 on the AMX route, on the integer paths (set_amx(False)) and the reference kernel, SQNR against bf16 and against the reference.
import copy, torch, lowbit
from lowbit.eval.models import load_smollm2
from lowbit.eval import sqnr
from lowbit.kernels import _ext
from lowbit.kernels.preference import KernelPreference
torch.set_num_threads(2)
model = load_smollm2()[0].to(torch.bfloat16).eval()
ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
q = copy.deepcopy(model); lowbit.quantize_(q, lowbit.Int8DynamicActivationInt4WeightConfig(group_size=32))
r = copy.deepcopy(model); lowbit.quantize_(r, lowbit.Int8DynamicActivationInt4WeightConfig(group_size=32, kernel=KernelPreference.REFERENCE))
e = _ext.load("int8_int4")
with torch.inference_mode():
    base = model(ids).logits.float()
    ref = r(ids).logits.float()
    e.set_amx(True); a = q(ids).logits.float()
    e.set_amx(False); v = q(ids).logits.float(); e.set_amx(True)
print("all-position logits SQNR vs bf16: reference", sqnr(base, ref), "amx route", sqnr(base, a), "vnni", sqnr(base, v))
print("vs reference: amx", sqnr(ref, a), "vnni", sqnr(ref, v))
