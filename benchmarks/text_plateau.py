"""Why a tiny BERT text classifier sits on its loss plateau under ESAM's defaults: the evidence.

A 3-class keyword task (the class is which of three keyword tokens a sequence holds), a tiny
random-initialised BERT, trained like the transformers `run_classification.py` example (AdamW,
lr 3e-3, linear decay, batch 32). Every variant is one `ESAMTrainer` run on the same data, seed and
initial weights; reported: the first step at which the training loss (mean of 8 steps) falls below
0.9 (ln 3 = 1.10 is the plateau), the final training loss, and how concentrated on one class the
rows SDS keeps are (`esam/sds_top_class_share`, against `esam/batch_top_class_share`).

    python benchmarks/text_plateau.py [--steps 171] [--seeds 0,1,2] [--out benchmarks/results/text_plateau.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
import transformers
from transformers import TrainerCallback

from esam_hf import ESAMTrainer, ESAMTrainingArguments

VOCAB, LENGTH, KEYWORDS = 100, 16, (3, 4, 5)

VARIANTS = {
    "plain (rho 0)": {"esam_rho": 0.0},
    "plain batch 16": {"esam_rho": 0.0, "per_device_train_batch_size": 16},
    "SAM": {"esam_rho": 0.05, "esam_beta": 1.0, "esam_gamma": 1.0},
    "SWP only (gamma 1)": {"esam_gamma": 1.0},
    "ESAM defaults": {},
    "ESAM defaults at rho 0.05": {"esam_rho": 0.05},
    "paper ESAM (sharpness selection)": {"esam_rho": 0.05, "esam_selection": "sharpness"},
    "ESAM defaults at rho 0.03 (0.05 x beta)": {"esam_rho": 0.03},
    "ESAM defaults + gamma warm-up 30%": {"esam_gamma_warmup": 0.3},
    "ESAM defaults at rho 0.03 + warm-up 30%": {"esam_rho": 0.03, "esam_gamma_warmup": 0.3},
    "ESAM defaults at rho 0.01": {"esam_rho": 0.01},
    "SDS only (beta 1)": {"esam_beta": 1.0, "esam_selection": "sharpness"},
    "random half": {"esam_beta": 1.0, "esam_selection": "random"},
    "random half rho 1e-9": {"esam_rho": 1e-9, "esam_beta": 1.0, "esam_selection": "random"},
    "SDS only lr 1e-2": {"esam_beta": 1.0, "learning_rate": 1e-2, "esam_selection": "sharpness"},
    "random half beta 0.6": {"esam_selection": "random"},
    "SDS by loss (beta 1)": {"esam_beta": 1.0, "esam_selection": "loss"},
    "SDS only rho 0.005": {"esam_beta": 1.0, "esam_rho": 0.005, "esam_selection": "sharpness"},
    "ESAM gamma warm-up 30%": {"esam_gamma_warmup": 0.3, "esam_selection": "sharpness"},
}


def keyword_task(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, VOCAB, (n, LENGTH), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    position = torch.randint(1, LENGTH, (n,), generator=g)
    ids[torch.arange(n), position] = torch.tensor(KEYWORDS)[labels]
    ids[:, 0] = 2  # [CLS]
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def tiny_bert(seed: int):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=3)
    return transformers.BertForSequenceClassification(config)


class LossCurve(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append({"step": state.global_step, "loss": logs["loss"],
                                **{k: v for k, v in logs.items() if k.startswith("esam/")}})


def run(variant: dict, steps: int, seed: int, data: list[dict], out_dir: str) -> dict:
    settings = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
                    lr_scheduler_type="linear", logging_steps=8, save_strategy="no", report_to="none", use_cpu=True,
                    disable_tqdm=True, seed=seed, dataloader_num_workers=0)
    args = ESAMTrainingArguments(**{**settings, **variant})
    curve = LossCurve()
    ESAMTrainer(model=tiny_bert(seed), args=args, train_dataset=data, callbacks=[curve]).train()
    below = next((log["step"] for log in curve.losses if log["loss"] < 0.9), None)
    early = [log for log in curve.losses if log["step"] <= 64 and "esam/sds_top_class_share" in log]
    shares = {key: statistics.fmean(log[f"esam/{key}"] for log in early) if early else None
              for key in ("batch_top_class_share", "sds_top_class_share")}
    return {"first_step_below_0.9": below, "final_loss": curve.losses[-1]["loss"], **shares, "curve": curve.losses}


def _mean(values) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.fmean(values):.2f}" if values else "-"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=171)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    data = keyword_task(2048, seed=0)
    results = {}
    print(f"| variant | first step with loss < 0.9 (seeds {args.seeds}) | final loss | top-class share, batch | "
          "top-class share, SDS rows (first 64 steps) |\n|---|---|---|---|---|")

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            runs = [run(VARIANTS[name], args.steps, int(s), data, tmp) for s in args.seeds.split(",")]
            results[name] = runs
            firsts = [r["first_step_below_0.9"] for r in runs]
            print(f"| {name} | {', '.join(str(f) if f is not None else '-' for f in firsts)} | "
                  f"{statistics.fmean(r['final_loss'] for r in runs):.3f} | "
                  f"{_mean(r['batch_top_class_share'] for r in runs)} | {_mean(r['sds_top_class_share'] for r in runs)} |",
                  flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"steps": args.steps, "variants": {k: VARIANTS[k] for k in results}, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
