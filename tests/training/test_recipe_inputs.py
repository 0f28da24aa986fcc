"""Bad recipe input gets a clear error before any training (nothing written), and k-shot prompts are built as
documented (training/icl.py) by `peftserve eval`, which reports like a training run."""

from __future__ import annotations

import json

import pytest

from training.errors import DataError, TrainConfigError


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from training.tasks import write_task

    return write_task(tmp_path_factory.mktemp("recipe-inputs"), "color", n_train=12, n_eval=6)


@pytest.fixture(scope="module")
def other_vocab_teacher(tmp_path_factory):
    """A T5 whose tokenizer has 41 sentinels instead of 125: 300 logits, not the base's 384."""
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("teacher")
    tok = ByT5Tokenizer(extra_ids=41)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


CASES = {
    "pattern without {input}": (dict(recipe="pattern", pattern="Is it warm?", verbalizer="warm=yes,cool=no"),
                                TrainConfigError, "has no {input} placeholder"),
    "verbalizer missing a label": (dict(recipe="pattern", pattern="{input}?", verbalizer="warm=yes"),
                                   DataError, "no word for label(s) ['cool']"),
    "two labels, one word": (dict(recipe="pattern", pattern="{input}?", verbalizer="warm=yes,cool=yes"),
                             TrainConfigError, "maps labels 'warm' and 'cool' to the same word 'yes'"),
    "empty context": (dict(recipe="distill", context="   "), TrainConfigError, "--context is empty"),
    "shots above the training set": (dict(recipe="distill", context="Answer.", shots=13), DataError,
                                     "--shots 13 is larger than the training set (12 rows"),
    "pattern flags on another recipe": (dict(pattern="{input}?"), TrainConfigError,
                                        "--pattern applies to --recipe pattern only"),
    "adaptive without text": (dict(recipe="adaptive"), TrainConfigError, "needs --domain-text FILE"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_recipe_input_fails_before_training(case, task, tiny_base_dir, tmp_path):
    from training.config import TrainConfig
    from training.train import prepare

    options, error, message = CASES[case]
    cfg = TrainConfig(method="lora", train=str(task[0]), eval=str(task[1]), output=tmp_path / "out",
                      base=str(tiny_base_dir), input_field="text", target_field="label", **options)
    with pytest.raises(error) as e:
        prepare(cfg)
    assert message in str(e.value)
    assert not cfg.output.exists()


def test_empty_context_file_and_other_vocabulary_teacher(task, tiny_base_dir, other_vocab_teacher, tmp_path):
    from training.config import TrainConfig
    from training.train import prepare

    empty = tmp_path / "context.txt"
    empty.write_text("\n  \n")
    common = dict(method="lora", recipe="distill", train=str(task[0]), output=tmp_path / "out",
                  base=str(tiny_base_dir), input_field="text", target_field="label")
    with pytest.raises(TrainConfigError, match="--context-file .* is empty"):
        prepare(TrainConfig(context_file=str(empty), **common))
    with pytest.raises(TrainConfigError, match="does not match the base's vocabulary .*300 logits.*384 logits"):
        prepare(TrainConfig(context="Answer.", teacher=str(other_vocab_teacher), **common))
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(task, tmp_path, capsys):
    from serve.cli import main

    assert main(["train", "--method", "lora", "--recipe", "pattern", "--pattern", "x", "--verbalizer", "a=b",
                 "--train", str(task[0]), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftserve train: error: --pattern/--verbalizer: pattern 'x' has no {input}")
    assert "\n" not in err and not (tmp_path / "out").exists()
    assert main(["eval", "--eval", str(task[1]), "--shots", "99", "--train", str(task[0]), "--input-field", "text",
                 "--target-field", "label"]) == 1
    assert "--shots 99 is larger than the training set" in capsys.readouterr().err


def test_k_shot_prompt_format():
    from training.icl import build_prompt, draw_shots

    shots = [("paint it red", "warm"), ("a shade of blue", "cool")]
    assert build_prompt(shots, "the wall is green") == "paint it red\nwarm\n\na shade of blue\ncool\n\nthe wall is green"
    assert build_prompt([], "the wall is green") == "the wall is green"
    assert build_prompt(shots[:1], "q", context="Be brief.") == "Be brief.\n\npaint it red\nwarm\n\nq"
    sources, targets = [f"s{i}" for i in range(10)], [f"t{i}" for i in range(10)]
    drawn = draw_shots(sources, targets, 3, seed=4)
    assert drawn == draw_shots(sources, targets, 3, seed=4) != draw_shots(sources, targets, 3, seed=5)
    assert all(sources.index(s) == targets.index(t) for s, t in drawn) and len(set(drawn)) == 3


def test_peftserve_eval_k_shot_reports_like_a_training_run(task, tiny_base_dir, tmp_path):
    from serve.cli import main
    from training import data as D
    from training.icl import build_prompt, draw_shots

    out = tmp_path / "icl"
    assert main(["eval", "--base", str(tiny_base_dir), "--eval", str(task[1]), "--eval-ood", f"ood={task[1]}",
                 "--shots", "2", "--train", str(task[0]), "--input-field", "text", "--target-field", "label",
                 "--max-target-length", "3", "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval_report.json").read_text())
    pool = D.load_pairs(str(task[0]), "text", "label")
    first = D.load_pairs(str(task[1]), "text", "label").sources[0]
    assert report["prompt_example"] == build_prompt(draw_shots(pool.sources, pool.targets, 2, seed=0), first)
    assert report["shots"] == 2 and report["recipe"] == "icl" and report["trainable_params"] == 0
    assert report["final_metrics"]["metric"] == "exact_match" and report["final_metrics"]["eval_rows"] == 6
    assert report["ood_metrics"]["ood"]["value"] == report["in_domain_metrics"]["value"]
    train_report_keys = {"final_metrics", "in_domain_metrics", "ood_metrics", "trainable_params", "steps",
                         "steps_to_converge", "train_seconds", "peak_memory_bytes", "task", "base", "config"}
    assert train_report_keys <= set(report)


def test_teacher_adapter_teaches_on_a_copy_of_the_base(task, tiny_base, tiny_base_dir, tmp_path):
    """--teacher-adapter: the teacher is the base plus that adapter (its own greedy outputs become the targets
    when rows have none); the student's base is left as it was."""
    from peft import LoraConfig

    from tests.peft_zoo import save_peft
    from training.config import TrainConfig
    from training.tasks import write_jsonl
    from training.train import generate, prepare

    teacher_dir = save_peft(tiny_base.model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, init_lora_weights=False,
                                                        target_modules=["q", "v", "wo"]), tmp_path / "teacher", 3)
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"text": f"paint it {c}"} for c in ("red", "blue", "green")])
    p = prepare(TrainConfig(method="lora", recipe="distill", context="Answer.", teacher_adapter=str(teacher_dir),
                            train=str(inputs), eval=str(inputs), output=tmp_path / "out", base=str(tiny_base_dir),
                            input_field="text", max_target_length=6, progress=False))
    assert hasattr(p.recipe.teacher, "peft_config")
    prompts = [f"Answer.\n\n{s}" for s in p.train.sources]
    with_adapter = [t or " " for t in generate(p.recipe.teacher, p.base.tokenizer, prompts, p.device, 256, 6, 8)]
    base_alone = [t or " " for t in generate(p.base.model, p.base.tokenizer, prompts, p.device, 256, 6, 8)]
    assert p.train.targets == with_adapter != base_alone  # the adapter's outputs, not the base's
    assert not any("lora" in name for name, _ in p.base.model.named_modules())
