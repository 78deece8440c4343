"""The prepared GPU command runs end to end on CPU at tiny sizes, so lent GPU minutes are not spent on typos."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    # This interpreter's scripts (esam-hf, python3) first, whether or not its environment is activated.
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "BUDGET": "900", "RUNS": str(tmp_path / "runs")}
    for call in ([], ["--short"]):
        done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *call, "--dry-run"], cwd=tmp_path,
                              env={**env, "OUT": str(out / (call[0][2:] if call else "long"))}, capture_output=True,
                              text=True, timeout=1200)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    long, short = (out / "long" / "summary.md").read_text(), (out / "short" / "summary.md").read_text()
    assert "[gpu_check] reproduce: exit 0" in long, long
    for part in ("bench", "profile", "train_profile", "fsdp2", "compiled_profile"):
        assert f"[gpu_check] {part}: exit 0" in short, short
    assert json.loads((out / "long" / "env.json").read_text())["dry_run"] is True
    assert "| sgd | 1 |" in long and "esam_ascent-seed0: finished" in long
    profile = json.loads((out / "short" / "profile.json").read_text())
    assert list(profile["profile"]) == ["esam_ascent", "sam", "esam"]  # the recommended mode first
    for name in ("train_profile", "compiled_profile"):
        assert json.loads((out / "short" / name / "profile.json").read_text())["steps"] == 3
        assert (out / "short" / name / "trace.json").is_file() and not (out / "short" / name / "run").exists()
    fsdp = json.loads((out / "short" / "fsdp2" / "fsdp_check.json").read_text())
    assert fsdp["agree"] and fsdp["fsdp"]["parameter_type"] == "DTensor" and fsdp["fsdp"]["world"] == 2
    assert (out / "long" / "runs" / "sgd-seed0" / "esam_run.json").is_file()


def test_gpu_check_refuses_a_missing_data_directory(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "nope")],
                          env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "give the CIFAR-10 data directory" in done.stderr


def test_fsdp_throughput_runs(tmp_path):
    """The FSDP2-against-DDP throughput benchmark runs end to end (tiny: 1 timed step, 1 repeat)."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_speed.py"), "fsdp", "--out", str(tmp_path),
                           "--steps", "1", "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "fsdp_throughput.json").read_text())
    for kind in ("ddp", "fsdp"):
        assert all(report[kind][m] > 0 for m in ("sam", "esam", "esam_random")), report
    assert "| fsdp |" in done.stdout


def test_cpu_study_check_runs_both_benchmarks_and_states_each_ordering(tmp_path, cifar_dir):
    """The accuracy regression check end to end at tiny sizes (its verdict at these sizes means nothing)."""
    out = tmp_path / "check.jsonl"
    env = {**os.environ, "ESAM_HF_TEST_DATA": str(cifar_dir.parent)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "study", "--check",
                           "--check_quick", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode in (0, 1), done.stdout[-2000:] + done.stderr[-2000:]
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["benchmark"], r["method"], r["seed"]) for r in runs) == sorted(
        [("overfit", m, seed) for m in ("sam", "sgd", "ascent") for seed in (0, 1)]
        + [("data_rich", m, seed) for m in ("sam", "sgd", "ascent", "random") for seed in (0, 1)])
    assert {r["data"] for r in runs} == {"subset", "cifar10-jpeg"}
    for bench in ("overfit", "data_rich"):
        assert f"{bench}, mean of seeds 0,1: " in done.stdout and "x SAM's process time" in done.stdout
    assert ("ordering holds" in done.stdout) == (done.returncode == 0)
