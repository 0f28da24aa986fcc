"""training/: one trainer for the peft methods (LoRA, DoRA, AdaLoRA, (IA)3, prompt tuning, P-tuning, prefix),
BitFit, AdapterHub's bottleneck adapters / prefix tuning / UniPELT / MAM (training/adapterhub/), and full
fine-tuning.

Entry points: `training.train.train(TrainConfig) -> TrainResult`, `training.sweep.run_sweep(path)`,
`training.demo.ensure_demo_adapters()`; the CLI lives in `training.cli`.
"""
