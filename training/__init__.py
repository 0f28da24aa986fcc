"""training/: one trainer for LoRA, (IA)3, BitFit, prompt tuning and full fine-tuning.

Entry points: `training.train.train(TrainConfig) -> TrainResult`, `training.sweep.run_sweep(path)`,
`training.demo.ensure_demo_adapters()`; the CLI lives in `training.cli`.
"""
