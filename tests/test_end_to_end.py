"""The whole flow on the demo profile: the generated notebook, the CLI, determinism."""

import json
import os
import pathlib
import subprocess
import sys

import nbformat
import pandas as pd
import papermill
import pytest
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small enough for CI, same code path as the full demo.
FAST = ["demo_warmup_rows=200", "demo_warmup_epochs=1", "epochs=1", "tta_option_views=2"]


def _fast_overrides(tmp):
    return FAST + [f"data_dir={tmp / 'demo'}", f"output_dir={tmp / 'run'}",
                   f"model_name_or_path={tmp / 'tiny' / 'qwen2_5_vl'}"]


def _check_submission(data_dir, submission_path):
    test = pd.read_csv(data_dir / "test.csv")
    sub = pd.read_csv(submission_path)
    assert list(sub.columns) == ["id", "answer"]
    assert sub["id"].tolist() == test["id"].tolist()  # one row per test id, in test order
    assert set(sub["answer"]) <= set("abcd")
    return sub


def test_generated_notebook_runs_on_demo_profile(tmp_path):
    """The notebook top to bottom on the demo, with the uncertainty gate on: the submission, the gate's report,
    and the error analysis shown under the last cells (the gallery's rows in the executed notebook)."""
    out = tmp_path / "executed.ipynb"
    overrides = _fast_overrides(tmp_path) + ["gate_fraction=0.1"]
    papermill.execute_notebook(str(ROOT / "Kaggle_AllInOne_Pro.ipynb"), str(out), cwd=str(ROOT), kernel_name="python3",
                               parameters={"PROFILE": "demo", "OVERRIDES": "\n".join(overrides)}, progress_bar=False)
    _check_submission(tmp_path / "demo", tmp_path / "run" / "submission.csv")
    for name in ("config.json", "metrics.json", "oof_probs.csv", "test_probs_ensemble.csv", "folds.csv",
                 "plots/confusion_matrix.png", "analysis/analysis.html", "fold0/test_gate.json"):
        assert (tmp_path / "run" / name).exists(), name
    gate = json.loads((tmp_path / "run" / "metrics.json").read_text())["gate"]
    assert gate["oof_rows_gated"] == 30 and gate["cost"]["test"]["gated"] == 30  # ceil(0.1 x 100) per fold
    shown = [o for cell in nbformat.read(out, as_version=4).cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("gallery-row" in str(o.get("data", {}).get("text/html", "")) for o in shown)
    _assert_no_alarm("".join(str(o.get("text", "")) for o in shown if o.get("output_type") == "stream"))


def _cli(tmp_path, run_dir):
    overrides = _fast_overrides(tmp_path)
    overrides[-2] = f"output_dir={run_dir}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    return subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *overrides], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)


def _assert_no_alarm(text):
    """What a newcomer reads as alarm and the project causes or can silence: bitsandbytes' failed hub lookup for
    a CPU kernel, peft's FutureWarning per fold, the versions printed twice."""
    assert "Failed to load CPU gemm_4bit_forward" not in text
    assert "FutureWarning" not in text and "is_gradient_checkpointing" not in text
    assert text.count("[versions]") == 1


def test_cli_is_deterministic_on_cpu(tmp_path):
    done = _cli(tmp_path, tmp_path / "run_a")
    _assert_no_alarm(done.stdout + done.stderr)
    _cli(tmp_path, tmp_path / "run_b")
    a = _check_submission(tmp_path / "demo", tmp_path / "run_a" / "submission.csv")
    b = _check_submission(tmp_path / "demo", tmp_path / "run_b" / "submission.csv")
    assert a.equals(b)
    pa = pd.read_csv(tmp_path / "run_a" / "test_probs_ensemble.csv")
    pb = pd.read_csv(tmp_path / "run_b" / "test_probs_ensemble.csv")
    assert pa.equals(pb)


@pytest.mark.parametrize("family,architecture", [("qwen3_vl", "Qwen3VL"), ("qwen3_5", "Qwen3_5"), ("gemma4", "Gemma4")])
def test_cli_demo_runs_with_the_other_families_warm_up_included(tmp_path, family, architecture):
    """`--profile demo demo_family=...`: the tiny Qwen3-VL / Qwen3.5 / Gemma 4 base is built and warmed up (its forward
    needs mm_token_type_ids) and the run writes a valid submission (the other tests run Qwen2.5-VL); the fast paths'
    self-check passes, Qwen3.5's shared prefix through its linear-attention state and Gemma's through its sliding
    window included."""
    if family == "qwen3_5" and not hasattr(transformers, "Qwen3_5ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3.5 (from 5.2)")
    if family == "gemma4" and not hasattr(transformers, "Gemma4ForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 4 (from 5.5)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    done = subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", "demo", f"demo_family={family}", "folds=0",
                           "demo_warmup_rows=64", "demo_warmup_epochs=1", "epochs=1", f"data_dir={tmp_path / 'demo'}",
                           f"output_dir={tmp_path / 'run'}", f"model_name_or_path={tmp_path / 'tiny' / family}"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert architecture in (tmp_path / "tiny" / family / "config.json").read_text()
    assert "[check] the cached-feature forward = the stock forward" in done.stdout
    assert "the shared-prefix option-order scoring = scoring each view on its own" in done.stdout
    _check_submission(tmp_path / "demo", tmp_path / "run" / "submission.csv")


def test_notebook_shows_a_known_user_error_without_a_traceback(tmp_path):
    """A bad setting in OVERRIDES: the cell's error output is the one message, not ~20 lines of Python frames."""
    import nbformat

    out = tmp_path / "executed.ipynb"
    try:
        papermill.execute_notebook(str(ROOT / "Kaggle_AllInOne_Pro.ipynb"), str(out), cwd=str(ROOT),
                                   kernel_name="python3", parameters={"PROFILE": "demo", "OVERRIDES": "epochs=two"},
                                   progress_bar=False)
    except papermill.PapermillExecutionError:
        pass
    else:
        raise AssertionError("the notebook ran with epochs=two")
    errors = [o for cell in nbformat.read(out, as_version=4).cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert len(errors) == 1 and errors[0]["ename"] == "ConfigError"
    text = "\n".join(errors[0]["traceback"])
    assert "config: epochs expects a whole number (e.g. 602112 or 768*768), got 'two'" in text
    assert "Traceback" not in text and "File " not in text and len(errors[0]["traceback"]) == 1
