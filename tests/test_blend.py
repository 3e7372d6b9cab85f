"""Blending finished runs (mcvqa/blend.py): synthetic run folders with planted probabilities, then one
end-to-end CLI blend of two real demo runs (Qwen2.5-VL and Qwen3-VL tiny models)."""

import datetime
import hashlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import numpy as np
import transformers
import pandas as pd
import pytest

from mcvqa.cli import main
from mcvqa.toolkit.blend import BlendError, blend_runs, fit_weights, log_loss
from mcvqa.core.data import PROB_COLUMNS
from mcvqa.core.submission import validate_submission
from mcvqa.snapshot import snapshot_experiment

ROOT = pathlib.Path(__file__).resolve().parents[1]
LETTERS = "abcd"


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _informative(labels, rng, strength=2.0):
    return _softmax(strength * np.eye(4)[labels] + rng.normal(size=(len(labels), 4)))


def _noise(n, rng):
    return rng.dirichlet(np.ones(4), size=n)


def make_run(path, train_ids, labels, oof, folds, test_ids, test, data_dir=None):
    """A finished run folder as the pipeline leaves it (the files the blend reads)."""
    path.mkdir(parents=True)
    frame = pd.DataFrame(oof, columns=PROB_COLUMNS)
    frame.insert(0, "id", train_ids)
    frame["fold"], frame["answer"] = folds, [LETTERS[i] for i in labels]
    frame.to_csv(path / "oof_probs.csv", index=False)
    pd.DataFrame({"id": train_ids, "fold": folds}).to_csv(path / "folds.csv", index=False)
    test_frame = pd.DataFrame(test, columns=PROB_COLUMNS)
    test_frame.insert(0, "id", test_ids)
    test_frame.to_csv(path / "test_probs_ensemble.csv", index=False)
    (path / "config.json").write_text(json.dumps({"data_dir": str(data_dir) if data_dir else "", "profile": "x"}))
    (path / "metrics.json").write_text(json.dumps({"profile": "x", "cv_accuracy": 0.0}))
    return path


@pytest.fixture
def planted(tmp_path):
    """Factory: planted(oof_a, oof_b, ...) -> run folders a, b sharing 600 train and 50 test ids, 3 folds."""
    rng = np.random.default_rng(0)
    n, n_test = 600, 50
    labels = rng.integers(0, 4, n)
    folds = np.arange(n) % 3
    train_ids, test_ids = [f"TRAIN_{i:04d}" for i in range(n)], [f"TEST_{i:03d}" for i in range(n_test)]

    def make(*oofs, folds_per_run=None, data_dir=None):
        runs = []
        for k, oof in enumerate(oofs):
            run_folds = folds if folds_per_run is None else folds_per_run[k]
            runs.append(make_run(tmp_path / "ab"[k], train_ids, labels, oof, run_folds, test_ids,
                                 _noise(n_test, np.random.default_rng(k)), data_dir))
        return runs

    make.labels, make.folds, make.rng, make.n = labels, folds, rng, n
    make.train_ids, make.test_ids, make.tmp = train_ids, test_ids, tmp_path
    return make


def _report(out):
    return json.loads((out / "blend_report.json").read_text())


def test_weights_recover_the_informative_member_over_noise(planted, tmp_path):
    a, b = planted(_informative(planted.labels, planted.rng), _noise(planted.n, planted.rng))
    report = blend_runs([a, b], tmp_path / "blend")
    weights = report["weights"]["global"]
    assert weights[str(a)] > 0.95 and abs(sum(weights.values()) - 1) < 1e-9 and min(weights.values()) >= 0
    # Given the other way round, the weight follows the member, not the position.
    report = blend_runs([b, a], tmp_path / "blend2")
    assert report["weights"]["global"][str(a)] > 0.95


def test_two_equally_good_independent_members_blend_to_a_lower_log_loss(planted, tmp_path):
    a, b = planted(_informative(planted.labels, planted.rng, 1.5), _informative(planted.labels, planted.rng, 1.5))
    report = blend_runs([a, b], tmp_path / "blend")
    member_losses = [m["log_loss"] for m in report["members"]]
    assert report["blend"]["out_of_fold"]["log_loss"] < min(member_losses) - 0.02
    assert report["blend"]["out_of_fold"]["accuracy"] >= min(m["cv_accuracy"] for m in report["members"])
    assert 0.3 < report["weights"]["global"][str(a)] < 0.7


def test_fit_weights_is_the_log_loss_optimum_on_the_simplex():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 300)
    members = np.stack([_informative(labels, rng, 1.0), _informative(labels, rng, 2.0), _noise(300, rng)])
    w = fit_weights(members, labels)
    best = log_loss(np.tensordot(w, members, 1), labels)
    for _ in range(200):  # no random point of the simplex does better
        other = rng.dirichlet(np.ones(3))
        assert best <= log_loss(np.tensordot(other, members, 1), labels) + 1e-7


def test_the_honest_estimate_never_uses_the_rows_it_scores(planted, tmp_path):
    labels, folds, n = planted.labels, planted.folds, planted.n
    # A: confidently right on fold 0, confidently wrong elsewhere. B: right but unconfident everywhere.
    wrong = (labels + 1) % 4
    a = np.where((folds == 0)[:, None], 0.01 + 0.96 * np.eye(4)[labels], 0.01 + 0.96 * np.eye(4)[wrong])
    p_label = planted.rng.uniform(0.26, 0.3, n)
    b = np.eye(4)[labels] * p_label[:, None] + (1 - np.eye(4)[labels]) * ((1 - p_label) / 3)[:, None]
    run_a, run_b = planted(a, b)
    report = blend_runs([run_a, run_b], tmp_path / "blend")
    # Fitted on all rows, A earns weight for its fold-0 rows ...
    assert report["weights"]["global"][str(run_a)] > 0.05
    # ... but fold 0 is scored with weights fitted on folds 1 and 2, where A is only ever wrong: B alone.
    honest = pd.read_csv(tmp_path / "blend" / "oof_probs.csv")
    assert honest["id"].tolist() == planted.train_ids and honest["fold"].tolist() == folds.tolist()
    np.testing.assert_allclose(honest[PROB_COLUMNS].to_numpy()[folds == 0], b[folds == 0], atol=1e-4)
    assert report["blend"]["out_of_fold"]["log_loss"] == pytest.approx(
        log_loss(honest[PROB_COLUMNS].to_numpy(), labels))
    assert report["blend"]["out_of_fold"]["log_loss"] > report["blend"]["in_sample"]["log_loss"] + 0.05


def test_mismatched_train_ids_name_the_file(planted, tmp_path):
    a, b = planted(_noise(planted.n, planted.rng), _noise(planted.n, planted.rng))
    oof = pd.read_csv(b / "oof_probs.csv")
    oof.loc[3, "id"] = "SOMEONE_ELSE"
    oof.to_csv(b / "oof_probs.csv", index=False)
    with pytest.raises(BlendError, match=r"b/oof_probs\.csv: its out-of-fold train ids differ.*SOMEONE_ELSE"):
        blend_runs([a, b], tmp_path / "blend")
    assert not (tmp_path / "blend").exists()


def test_test_ids_in_another_order_name_the_file(planted, tmp_path):
    a, b = planted(_noise(planted.n, planted.rng), _noise(planted.n, planted.rng))
    test = pd.read_csv(b / "test_probs_ensemble.csv")
    test.iloc[::-1].to_csv(b / "test_probs_ensemble.csv", index=False)
    with pytest.raises(BlendError, match=r"b/test_probs_ensemble\.csv: its test ids are in another order"):
        blend_runs([a, b], tmp_path / "blend")
    (b / "test_probs_ensemble.csv").unlink()
    with pytest.raises(BlendError, match=r"b/test_probs_ensemble\.csv: not found"):
        blend_runs([a, b], tmp_path / "blend")


def _snapshot(folder):
    return {p.relative_to(folder): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def test_read_only_members_work_and_stay_untouched_and_differing_folds_are_said(planted, tmp_path, capsys):
    other_folds = (np.arange(planted.n) + 1) % 3
    a, b = planted(_informative(planted.labels, planted.rng), _noise(planted.n, planted.rng),
                   folds_per_run=[planted.folds, other_folds])
    before = {run: _snapshot(run) for run in (a, b)}
    for run in (a, b):
        for path in [*run.iterdir(), run]:
            path.chmod(stat.S_IREAD | (stat.S_IXUSR if path.is_dir() else 0))
    try:
        report = blend_runs([a, b], tmp_path / "blend")
    finally:
        for run in (a, b):
            for path in [run, *run.iterdir()]:
                path.chmod(0o755)
    assert {run: _snapshot(run) for run in (a, b)} == before
    assert not report["folds_agree"] and report["folds_differ"][0]["ids_in_another_fold"] == planted.n
    assert "folds differ" in capsys.readouterr().out
    with pytest.raises(BlendError, match="is one of the member run folders"):
        blend_runs([a, b], a)


def _data_dir(path, train_ids, train_questions, test_ids, test_questions):
    path.mkdir()
    for name, ids, questions in (("train", train_ids, train_questions), ("test", test_ids, test_questions)):
        frame = pd.DataFrame({"id": ids, "path": "x.png", "question": questions, "a": "1", "b": "2", "c": "3",
                              "d": "4"})
        if name == "train":
            frame["answer"] = "a"
        frame.to_csv(path / f"{name}.csv", index=False)
    pd.DataFrame({"id": test_ids, "answer": "a"}).to_csv(path / "sample_submission.csv", index=False)
    return path


def test_per_type_weights_follow_the_member_good_at_each_type(planted, tmp_path):
    n, labels, rng = planted.n, planted.labels, planted.rng
    kinds = np.array(["color"] * 290 + ["count"] * 290 + ["position"] * 20)
    questions = {"color": "도형은 무슨 색입니까?", "count": "도형이 몇 개 있습니까?", "position": "도형은 어디에 있습니까?"}
    n_test = len(planted.test_ids)
    test_kinds = np.array(["color", "count"] * (n_test // 2))
    data = _data_dir(tmp_path / "data", planted.train_ids, [questions[k] for k in kinds], planted.test_ids,
                     [questions[k] for k in test_kinds])
    good, noise = _informative(labels, rng), _noise(n, rng)
    a = np.where((kinds == "count")[:, None], good, noise)  # A knows counting, B colours
    b = np.where((kinds == "color")[:, None], good, noise)
    run_a, run_b = planted(a, b, data_dir=data)
    report = blend_runs([run_a, run_b], tmp_path / "blend", per_type=True)
    weights = report["weights"]
    assert weights["count"][str(run_a)] > 0.95 and weights["color"][str(run_b)] > 0.95
    assert "position" not in weights and report["types_on_global_weights"] == ["position"]
    assert report["type_rows"] == {"count": 290, "color": 290, "position": 20}
    by_type = [m["accuracy_by_type"] for m in report["members"]]
    assert by_type[0]["count"] > by_type[1]["count"] + 0.3 and by_type[1]["color"] > by_type[0]["color"] + 0.3
    plain = blend_runs([run_a, run_b], tmp_path / "plain")
    assert report["blend"]["out_of_fold"]["log_loss"] < plain["blend"]["out_of_fold"]["log_loss"] - 0.2
    # Test rows get their type's weights: colour rows are (almost) B's probabilities.
    test = pd.read_csv(tmp_path / "blend" / "test_probs_ensemble.csv")[PROB_COLUMNS].to_numpy()
    b_test = pd.read_csv(run_b / "test_probs_ensemble.csv")[PROB_COLUMNS].to_numpy()
    np.testing.assert_allclose(test[test_kinds == "color"], b_test[test_kinds == "color"], atol=0.03)
    markdown = (tmp_path / "blend" / "blend_report.md").read_text()
    assert "fewer than 30 rows use the global weights: position (20)" in markdown
    with pytest.raises(BlendError, match="--per-type needs the question text.*Fix: --data-dir"):
        blend_runs([run_a, run_b], tmp_path / "blend3", per_type=True, data_dir=tmp_path / "nowhere")


def test_a_snapshot_of_a_blend_folder_reports_the_members_their_weights_and_the_blends_cv(planted, tmp_path):
    a, b = planted(_informative(planted.labels, planted.rng, 1.5), _informative(planted.labels, planted.rng, 1.5))
    for run, model in ((a, "Qwen/Qwen2.5-VL-7B-Instruct"), (b, "/kaggle/input/qwen3-vl/Qwen3-VL-8B-Instruct/")):
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "model_name_or_path": model}))
    report = blend_runs([a, b], tmp_path / "blend")
    exp = snapshot_experiment(tmp_path / "blend", "ab", experiments_dir=tmp_path / "exp",
                              report_path=tmp_path / "REPORT.md", today=datetime.date(2025, 3, 7))
    text = (exp / "REPORT.md").read_text()
    weights, blend = report["weights"]["global"], report["blend"]
    for member, model in zip(report["members"], ("Qwen2.5-VL-7B-Instruct", "Qwen3-VL-8B-Instruct")):
        assert (f"| `{member['run']}` | {model} | x | {member['cv_accuracy']:.4f} | {member['log_loss']:.4f} | "
                f"{weights[member['run']]:.3f} |") in text, member["run"]
    assert f"| out-of-fold (honest: weights fitted without the scored rows) | {blend['out_of_fold']['accuracy']:.4f} |" in text
    assert f"| in-sample (weights fitted on these rows: optimistic) | {blend['in_sample']['accuracy']:.4f} |" in text
    assert "- Model: blend of Qwen2.5-VL-7B-Instruct, Qwen3-VL-8B-Instruct" in text
    assert json.loads((exp / "blend" / "blend_report.json").read_text()) == report
    rows = [line for line in (tmp_path / "REPORT.md").read_text().splitlines() if line.startswith("| 2025-03-07")]
    assert len(rows) == 1
    date, experiment, model, cv, lb, notes = (cell.strip() for cell in rows[0].strip("|").split("|"))
    assert model == "blend: Qwen2.5-VL-7B-Instruct + Qwen3-VL-8B-Instruct"
    assert cv == f"{blend['out_of_fold']['accuracy']:.4f}" and f"in-sample {blend['in_sample']['accuracy']:.4f}" in notes
    assert all(f"{pathlib.Path(m['run']).name} {m['cv_accuracy']:.4f} (w {weights[m['run']]:.2f})" in notes
               for m in report["members"])
    # A run with blend_with has its blend in <run>/blend/: the same tables, as the run's submission.
    shutil.copytree(tmp_path / "blend", a / "blend")
    exp = snapshot_experiment(a, "a", experiments_dir=tmp_path / "exp", report_path=tmp_path / "REPORT.md",
                              today=datetime.date(2025, 3, 7))
    text = (exp / "REPORT.md").read_text()
    assert "## Blend (the submission)" in text and "- Model: `Qwen/Qwen2.5-VL-7B-Instruct`" in text
    assert f"| out-of-fold (honest: weights fitted without the scored rows) | {blend['out_of_fold']['accuracy']:.4f} |" in text
    row = (tmp_path / "REPORT.md").read_text().splitlines()[-1]
    assert row.split("|")[3].strip() == "Qwen2.5-VL-7B-Instruct" and "profile: x" in row


# --- end to end: two real demo runs through the CLI ------------------------------------------------------

FAST = ["demo_warmup_rows=200", "demo_warmup_epochs=1", "max_train_rows=60", "n_folds=2", "epochs=1",
        "tta_option_views=1", "evals_per_epoch=1"]


def _env():
    return {k: v for k, v in os.environ.items() if not k.startswith("MCVQA_")}


# The runner-up of a 2026 sister competition gained +1.2 pp blending model families: a Qwen run and a Gemma 4 run
# (another tokenizer, chat format and image size per image, the same ids) where transformers has Gemma 4.
OTHER_FAMILY = "gemma4" if hasattr(transformers, "Gemma4ForConditionalGeneration") else "qwen3_vl"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blend_demo")
    runs = []
    for family in ("qwen2_5_vl", OTHER_FAMILY):
        run = tmp / family
        done = subprocess.run([sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *FAST,
                               f"demo_family={family}", f"data_dir={tmp / 'demo'}",
                               f"model_name_or_path={tmp / 'tiny' / family}", f"output_dir={run}"],
                              cwd=ROOT, env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
        runs.append(run)
    return tmp, runs


def test_cli_blends_two_demo_runs_of_both_families(demo_runs, capsys):
    tmp, runs = demo_runs
    out = tmp / "blend"
    done = subprocess.run([sys.executable, "-m", "mcvqa", "blend", *map(str, runs), "--out", str(out), "--per-type",
                           "--min-type-rows", "10"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    report = _report(out)
    assert [m["run"] for m in report["members"]] == list(map(str, runs))
    assert [m["demo_family"] for m in report["members"]] == ["qwen2_5_vl", OTHER_FAMILY]
    assert len(report["disagreement"]) == 1 and 0 <= report["disagreement"][0]["disagreement"] <= 1
    assert report["n_oof"] == 60 and report["folds_agree"] and "holdout_accuracy" in report
    assert set(report["type_rows"]) == {"color", "what", "count", "position"}
    test = pd.read_csv(tmp / "demo" / "test.csv")
    validate_submission(pd.read_csv(out / "submission.csv"), test["id"].tolist())
    assert pd.read_csv(out / "test_probs_ensemble.csv")["id"].tolist() == test["id"].tolist()
    assert "out-of-fold (honest" in done.stdout and "in-sample" in done.stdout
    # The blend folder gets the plots a run folder gets, of the blend's own predictions.
    assert {p.name for p in (out / "plots").glob("*.png")} >= {"prediction_distribution.png", "confusion_matrix.png",
                                                               "reliability.png", "answer_distribution.png"}
    # A member that is not a run folder, through the CLI (in-process): one line, status 2, the folder named.
    assert main(["blend", str(runs[0]), str(tmp / "nowhere"), "--out", str(tmp / "blend2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere: no such run folder" in err and len(err.splitlines()) == 1


def test_a_run_with_blend_with_submits_the_blend_and_keeps_its_own(demo_runs, tmp_path):
    """blend_with through `run`: this run (here inference-only from the first demo run's adapters) blended with
    the second run; its submission is the blend, the same as `blend` of the two folders; its own is kept; every
    run gets its error analysis. A member that is no run folder stops the run before any training."""
    tmp, runs = demo_runs
    run = tmp_path / "with_blend"
    args = [sys.executable, "-m", "mcvqa", "run", "--profile", "demo", *FAST, f"data_dir={tmp / 'demo'}",
            f"model_name_or_path={tmp / 'tiny' / 'qwen2_5_vl'}", f"adapters_from={runs[0]}"]
    done = subprocess.run([*args, f"output_dir={run}", f"blend_with={runs[1]}"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    reference = blend_runs([runs[0], runs[1]], tmp_path / "reference")
    pd.testing.assert_frame_equal(pd.read_csv(run / "blend" / "test_probs_ensemble.csv"),
                                  pd.read_csv(tmp_path / "reference" / "test_probs_ensemble.csv"), atol=1e-6)
    assert pd.read_csv(run / "submission.csv").equals(pd.read_csv(run / "blend" / "submission.csv"))
    own = pd.read_csv(run / "test_probs_ensemble.csv")
    kept = pd.read_csv(run / "submission_this_run.csv")
    assert (kept["answer"].to_numpy() == np.array(list("abcd"))[own[["p_a", "p_b", "p_c", "p_d"]].to_numpy().argmax(1)]).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["blend"]["out_of_fold_accuracy"] == pytest.approx(reference["blend"]["out_of_fold"]["accuracy"])
    assert json.loads((run / "analysis" / "analysis.json").read_text())["n_rows"] == 60
    done = subprocess.run([*args, f"output_dir={tmp_path / 'bad'}", f"blend_with={tmp / 'nowhere'}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "nowhere: no such run folder" in done.stderr and "Traceback" not in done.stderr
    assert "[fold 0]" not in done.stdout and not (tmp_path / "bad" / "fold0").exists()
