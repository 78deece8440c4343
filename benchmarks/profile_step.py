"""Time and profile one optimizer step of SGD, SAM and ESAM in a plain PyTorch loop (no Trainer),
interleaved, median of 5 repeats, then a torch.profiler table of three ESAM steps.

    python benchmarks/profile_step.py            # CPU: quarter-width cifar_resnet18, batch 64
"""
import torch, timm, esam_hf, time, statistics
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
from esam_hf import ESAM
torch.manual_seed(0)
m = timm.create_model("cifar_resnet18", channels=[16,32,64,128], num_classes=10)
x, y = torch.randn(64,3,32,32), torch.randint(0,10,(64,))
opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
def lf(b):
    losses = F.cross_entropy(m(b[0]), b[1], reduction="none")
    return losses.mean(), losses.detach()
def sgd_step():
    opt.zero_grad(set_to_none=True); lf((x,y))[0].backward(); opt.step()
configs = {"sgd": None, "sam": ESAM(m, rho=0.05, beta=1, gamma=1), "esam": ESAM(m, rho=0.05, beta=0.6, gamma=0.5)}
def step(e):
    if e is None: return sgd_step()
    opt.zero_grad(set_to_none=True); e.step(lf, (x,y)); opt.step()
times = {k: [] for k in configs}
for r in range(5):
    for k, e in configs.items():
        step(e); t = time.perf_counter()
        for _ in range(5): step(e)
        times[k].append((time.perf_counter()-t)/5)
med = {k: statistics.median(v) for k, v in times.items()}
print({k: f"{64/v:.0f} img/s" for k, v in med.items()}, "esam/sgd", med["sgd"]/med["esam"], "sam/sgd", med["sgd"]/med["sam"])
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(3): step(configs["esam"])
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))
