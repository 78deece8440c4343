"""ESAMTrainer under the Trainer's FSDP2 against one process without FSDP, on this machine's device.

On a GPU: FSDP2 on every visible GPU (`torchrun`; one GPU is a world of one, still the whole FSDP2 code
path: fully_shard, DTensor shards, reduce-scatter); on a CPU (--dry-run, for the test suite): two gloo
processes, with FSDP switched on by hand (accelerate enables it only on accelerator devices). The case is
the test suite's (tests/fsdp_case.py: a tiny ViT, SWP on, SDS off so one process can replay the global
batch). Writes JSON with the largest weight difference and both runs' seconds; exit 1 if they disagree.
`benchmarks/gpu_check.sh --short` runs it as its FSDP2 part.

    python benchmarks/gpu_check_fsdp.py --out OUT_DIR [--dry-run]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # one case for the tests and this check


def worker(kind: str, out: str, world: int) -> None:
    import torch

    from fsdp_case import enable_fsdp_on_cpu, leave_process_group, trainer_case
    from helpers import SeqESAMTrainer

    cuda = torch.cuda.is_available()
    if kind == "fsdp" and not cuda:
        enable_fsdp_on_cpu()
    model, args, data = trainer_case(f"{out}/{kind}", "trainer", fsdp=kind == "fsdp", world=world, use_cpu=not cuda)
    trainer = SeqESAMTrainer(model=model, args=args, train_dataset=data)
    began = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - began
    params = dict(trainer.model.named_parameters())
    state = {n: (p.full_tensor() if type(p).__name__ == "DTensor" else p).detach().float().cpu() for n, p in params.items()}
    if trainer.args.process_index == 0:
        torch.save({"state": state, "seconds": seconds, "parameter_type": type(next(iter(params.values()))).__name__,
                    "device": str(next(iter(params.values())).device), "world": trainer.args.world_size},
                   f"{out}/{kind}.pt")
    leave_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="Folder for fsdp_check.json (and the runs).")
    parser.add_argument("--dry-run", action="store_true", help="CPU, two gloo processes (no GPU needed).")
    parser.add_argument("--worker", choices=["fsdp", "single"], help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.out, opts.world)
        return 0
    import torch

    if not opts.dry_run and not torch.cuda.is_available():
        parser.error("no GPU here: use --dry-run on a CPU")
    world = torch.cuda.device_count() if not opts.dry_run else 2
    os.makedirs(opts.out, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if opts.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    me = [str(Path(__file__).resolve()), "--out", opts.out, "--world", str(world)]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
                    *me, "--worker", "fsdp"], env=env, check=True)
    subprocess.run([sys.executable, *me, "--worker", "single"], env=env, check=True)
    fsdp, single = (torch.load(f"{opts.out}/{k}.pt", weights_only=False) for k in ("fsdp", "single"))
    diff = {n: float((fsdp["state"][n] - v).abs().max()) for n, v in single["state"].items()}
    worst = max(diff, key=diff.get)
    agree = all(torch.allclose(fsdp["state"][n], v, rtol=1e-4, atol=2e-6) for n, v in single["state"].items())
    report = {"agree": agree, "largest_difference": diff[worst], "at": worst, "fsdp": {k: fsdp[k] for k in
              ("seconds", "parameter_type", "device", "world")}, "single": {k: single[k] for k in ("seconds", "device")},
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    json.dump(report, open(f"{opts.out}/fsdp_check.json", "w"), indent=2)
    print(json.dumps(report, indent=2))
    return 0 if agree and fsdp["parameter_type"] == "DTensor" else 1


if __name__ == "__main__":
    sys.exit(main())
