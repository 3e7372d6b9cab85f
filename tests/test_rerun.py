"""Re-running into a run folder reuses only what belongs to the current data (resume.py), and epochs=0
is a zero-shot run: through the CLI on the demo, one fold."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["demo_warmup_rows=200", "demo_warmup_epochs=1", "max_train_rows=90", "epochs=1", "folds=0",
        "tta_option_views=1", "evals_per_epoch=1"]


def _cli(tmp, data_dir, run_dir, *extra, expect=0):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}
    done = subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *FAST, f"data_dir={data_dir}",
                           f"model_name_or_path={tmp / 'tiny'}", f"output_dir={run_dir}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == expect, (done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    _cli(tmp, tmp / "demo", tmp / "run")
    return tmp


def _variant(first_run, tmp_path, edit_test=None, edit_train=None):
    """A copy of the demo data with test.csv / train.csv edited, and a copy of the finished run folder."""
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(first_run / "demo", data)
    shutil.copytree(first_run / "run", run)
    for name, edit in (("test.csv", edit_test), ("train.csv", edit_train)):
        if edit is not None:
            edit(pd.read_csv(data / name)).to_csv(data / name, index=False)
    # A competition's sample submission lists the test ids in test.csv's order.
    pd.read_csv(data / "test.csv")[["id"]].assign(answer="a").to_csv(data / "sample_submission.csv", index=False)
    return data, run


def _probs_by_id(path):
    return pd.read_csv(path).set_index("id").sort_index()


def test_same_test_ids_in_another_order_are_predicted_again_not_matched_by_position(first_run, tmp_path):
    data, run = _variant(first_run, tmp_path, edit_test=lambda t: t.sample(frac=1.0, random_state=3))
    done = _cli(first_run, data, run)
    assert "test.csv changed since this fold predicted it (the same ids in another order)" in done.stdout
    assert "predictions exist" not in done.stdout
    new_order = pd.read_csv(data / "test.csv")["id"].tolist()
    assert pd.read_csv(run / "submission.csv")["id"].tolist() == new_order
    # The same model on the same rows: each id keeps its probabilities (up to another batch composition).
    pd.testing.assert_frame_equal(_probs_by_id(run / "test_probs_ensemble.csv"),
                                  _probs_by_id(first_run / "run" / "test_probs_ensemble.csv"), atol=1e-5)


def test_fewer_test_rows_are_predicted_again(first_run, tmp_path):
    data, run = _variant(first_run, tmp_path, edit_test=lambda t: t.iloc[:60])
    done = _cli(first_run, data, run)
    assert "(100 rows then, 60 now)" in done.stdout
    assert len(pd.read_csv(run / "submission.csv")) == 60


def test_an_unchanged_rerun_skips_the_fold(first_run, tmp_path):
    data, run = _variant(first_run, tmp_path)
    done = _cli(first_run, data, run)
    assert "[fold 0] predictions exist and match the current rows, skipping" in done.stdout


def test_changed_training_rows_stop_with_the_fold_and_the_fix_and_no_traceback(first_run, tmp_path):
    def edit(train):
        train.loc[5, "question"] = train.loc[5, "question"] + " (수정됨)"
        return train

    data, run = _variant(first_run, tmp_path, edit_train=edit)
    done = _cli(first_run, data, run, expect=2)
    assert "fold 0 was trained on other rows of train.csv than now" in done.stderr
    assert "other questions, options, answers or images" in done.stderr and "Fix: use a new output_dir" in done.stderr
    assert "Traceback" not in done.stderr


def test_epochs_0_is_zero_shot_and_a_later_run_trains(first_run, tmp_path):
    run = tmp_path / "zero"
    done = _cli(first_run, first_run / "demo", run, "epochs=0")
    assert "[done] zero-shot (epochs=0" in done.stdout
    assert json.loads((run / "metrics.json").read_text())["zero_shot"] is True
    assert len(pd.read_csv(run / "submission.csv")) == 100 and not (run / "fold0" / "DONE.json").exists()
    done = _cli(first_run, first_run / "demo", run)  # epochs=1 into the same folder: the fold is trained now
    assert "[fold 0] was a zero-shot fold (epochs=0): training it now" in done.stdout
    assert (run / "fold0" / "DONE.json").exists() and json.loads((run / "metrics.json").read_text())["zero_shot"] is False
    # ...and a zero-shot run never overwrites a trained fold.
    done = _cli(first_run, first_run / "demo", run, "epochs=0", expect=2)
    assert "fold 0 is trained, and epochs=0 asks for the untrained base model" in done.stderr


def test_a_bad_setting_is_one_line_without_traceback(first_run, tmp_path):
    done = _cli(first_run, first_run / "demo", tmp_path / "run", "epochs=two", expect=2)
    assert done.stderr.strip().splitlines()[-1] == "error: config: epochs expects a whole number (e.g. 602112 or 768*768), got 'two'"
    assert "Traceback" not in done.stderr


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_inference_only_from_an_earlier_runs_adapters_into_a_new_folder(first_run, tmp_path):
    source = first_run / "run"
    before = _tree(source)
    run = tmp_path / "reuse"
    done = _cli(first_run, first_run / "demo", run, f"adapters_from={source}")
    assert "predicting with its adapters, no training" in done.stdout and "[train]" not in done.stdout
    assert _tree(source) == before  # the earlier run is only read
    pd.testing.assert_frame_equal(_probs_by_id(run / "test_probs_ensemble.csv"),
                                  _probs_by_id(source / "test_probs_ensemble.csv"), atol=1e-6)
    assert (run / "fold0" / "best_adapter.pt").exists() and (run / "submission.csv").exists()
    # Other prompts, or other folds (its out-of-fold rows would be training rows), stop with the fix.
    done = _cli(first_run, first_run / "demo", tmp_path / "other_prompt", f"adapters_from={source}",
                "instruction_first=false", expect=2)
    assert "was trained with other prompt/image settings (instruction_first: True then, False now)" in done.stderr
    done = _cli(first_run, first_run / "demo", tmp_path / "other_folds", f"adapters_from={source}", "seed=7", expect=2)
    assert "split train.csv into other folds than this run would" in done.stderr


def test_a_tiny_time_budget_still_writes_a_valid_submission(first_run, tmp_path):
    """time_budget_hours far too small: fold 0 trains one step (its best adapter kept), predicts and writes the
    submission; folds 1 and 2 are skipped and said to be; the metrics record it."""
    run = tmp_path / "budget"
    done = _cli(first_run, first_run / "demo", run, "folds=all", "time_budget_hours=0.0001")
    assert "[time] fold 0: training stops at step 1" in done.stdout
    assert "[time] fold 1 skipped" in done.stdout and "[time] fold 2 skipped" in done.stdout
    assert json.loads((run / "fold0" / "DONE.json").read_text())["stopped_for_time"] is True
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["folds_skipped_for_time"] == [1, 2] and len(metrics["fold_accuracy"]) == 1
    submission = pd.read_csv(run / "submission.csv")
    assert submission["id"].tolist() == pd.read_csv(first_run / "demo" / "test.csv")["id"].tolist()
    # Given time, a re-run trains the skipped folds.
    done = _cli(first_run, first_run / "demo", run, "folds=all")
    assert json.loads((run / "metrics.json").read_text())["folds_skipped_for_time"] == []


def test_the_gate_on_a_finished_run_predicts_again_without_training(first_run, tmp_path):
    """gate_fraction set on a finished run folder: the fold is predicted again with its saved adapter (no
    training); its least certain out-of-fold rows get 24 option orders; every other row keeps the normal
    pass's probabilities; metrics.json reports the gated rows' accuracy before and after, from these files."""
    data, run = _variant(first_run, tmp_path)
    done_before = (run / "fold0" / "DONE.json").read_bytes()
    done = _cli(first_run, data, run, "gate_fraction=0.3", "gate_apply=always")
    assert "prediction settings changed (gate_fraction: 0.0 then, 0.3 now" in done.stdout
    assert "[train] fold 0: already finished" in done.stdout and (run / "fold0" / "DONE.json").read_bytes() == done_before
    normal = _probs_by_id(first_run / "run" / "fold0" / "oof_probs.csv")
    ungated = _probs_by_id(run / "fold0" / "oof_probs_ungated.csv")
    pd.testing.assert_frame_equal(ungated, normal, atol=1e-6)  # the same normal pass as the first run's
    oof = pd.read_csv(run / "oof_probs.csv").set_index("id").sort_index()
    gated = oof["gated"].to_numpy()
    assert gated.sum() == int(np.ceil(0.3 * len(oof))) == len(json.loads((run / "fold0" / "oof_gate.json").read_text())["gated_ids"])
    columns = ["p_a", "p_b", "p_c", "p_d"]
    assert (oof.loc[~gated, columns].to_numpy() == ungated.loc[~gated, columns].to_numpy()).all()  # bit for bit
    assert np.abs(oof.loc[gated, columns].to_numpy() - ungated.loc[gated, columns].to_numpy()).max() > 1e-4
    # The report's numbers, recomputed from the files.
    letters = np.array(list("abcd"))
    right_after = letters[oof[columns].to_numpy().argmax(1)] == oof["answer"].to_numpy()
    right_before = letters[ungated[columns].to_numpy().argmax(1)] == oof["answer"].to_numpy()
    gate = json.loads((run / "metrics.json").read_text())["gate"]
    assert gate["applied"] and gate["oof_rows_gated"] == gated.sum()
    assert gate["oof_accuracy_gated_rows_before"] == pytest.approx(right_before[gated].mean())
    assert gate["oof_accuracy_gated_rows_after"] == pytest.approx(right_after[gated].mean())
    assert gate["cost"]["test"]["extra_views"] == int(np.ceil(0.3 * 100)) * 23
    # The submission is the gated test probabilities' (one fold: its letters).
    test_probs = pd.read_csv(run / "fold0" / "test_probs.csv")
    submission = pd.read_csv(run / "submission.csv")
    assert (submission["answer"].to_numpy() == letters[test_probs[columns].to_numpy().argmax(1)]).all()
    # gate_apply=auto on the same folder (nothing predicted again): the submission's side follows the evidence.
    done = _cli(first_run, data, run, "gate_fraction=0.3", "gate_apply=auto")
    assert "[fold 0] predictions exist and match the current rows, skipping" in done.stdout
    gained = right_after[gated].mean() > right_before[gated].mean()
    assert json.loads((run / "metrics.json").read_text())["gate"]["applied"] == gained
    chosen = pd.read_csv(run / "oof_probs.csv").set_index("id").sort_index()[columns].to_numpy()
    assert (chosen == (oof if gained else ungated)[columns].to_numpy()).all()
    ensemble = pd.read_csv(run / "test_probs_ensemble.csv")[columns].to_numpy()
    side = test_probs if gained else pd.read_csv(run / "fold0" / "test_probs_ungated.csv")
    np.testing.assert_allclose(ensemble, side[columns].to_numpy(), atol=1e-12)
    _cli(first_run, data, run, "gate_fraction=0.3", "gate_apply=always")  # back, for the snapshot below
    # The snapshot's REPORT.md shows the gate's evidence and the run's error analysis, copied with it.
    from mcvqa.snapshot import snapshot_experiment

    exp = snapshot_experiment(run, "gate", experiments_dir=tmp_path / "exp", report_path=tmp_path / "REPORT.md")
    report = (exp / "REPORT.md").read_text()
    assert f"| accuracy on the {gated.sum()} gated of {len(oof)} rows | {right_before[gated].mean():.4f} | " \
           f"{right_after[gated].mean():.4f} |" in report and "Applied to the submission: **yes**" in report
    assert "## Error analysis" in report and (exp / "analysis" / "analysis.html").exists()
    assert "](plots/uncertainty_gate.png)" in report and (exp / "plots" / "uncertainty_gate.png").exists()
    # Turned off again: predicted again, the gate's files gone, the normal pass's probabilities back.
    done = _cli(first_run, data, run)
    assert "prediction settings changed (gate_fraction: 0.3 then, 0.0 now)" in done.stdout
    assert not (run / "fold0" / "oof_gate.json").exists() and "gate" not in json.loads((run / "metrics.json").read_text())
