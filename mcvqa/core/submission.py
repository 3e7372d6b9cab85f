"""## Submission: validate and write the answer file atomically

Builds the `id, answer` table from the predicted letters and checks it against the test ids before
anything touches the disk: same count, same order, unique ids, only letters a-d. With the competition's
`sample_submission.csv` (checked before the first fold by `read_sample_submission`) it takes that file's
column names and row order. The file is written
to a temporary file in the same folder and moved into place with `os.replace`, so a crash never leaves
a half-written CSV and a rejected submission never overwrites a good one from an earlier run.
"""
import logging
import os
from pathlib import Path

import pandas as pd

from ..machinery.errors import UserError
from ..machinery.files import atomic_write
from .data import OPTION_LETTERS

SUBMISSION_COLUMNS = ("id", "answer")
MAX_LISTED_SUBMISSION_ROWS = 5


class SubmissionError(UserError, ValueError):
    """The submission does not match the test set or the answer alphabet."""


def _describe_offenders(what, offenders):
    # CSV line = position + 2 (header is line 1), matching what a spreadsheet shows.
    listed = "; ".join(f"line {position + 2}: {detail}"
                       for position, detail in offenders[:MAX_LISTED_SUBMISSION_ROWS])
    more = len(offenders) - MAX_LISTED_SUBMISSION_ROWS
    return f"{len(offenders)} {what} ({listed}{f'; ... {more} more' if more > 0 else ''})"


def _submission_problems(ids, answers, expected_ids, alphabet):
    if len(ids) != len(expected_ids):
        return [f"has {len(ids)} rows but the test set has {len(expected_ids)}"]
    problems = []
    duplicated = pd.Series(ids).duplicated(keep=False)
    duplicates = [(i, f"id {ids[i]!r}") for i in duplicated[duplicated].index]
    if duplicates:
        problems.append(_describe_offenders("rows with duplicate ids", duplicates))
    misplaced = [(i, f"id {got!r}, test expects {want!r}")
                 for i, (got, want) in enumerate(zip(ids, expected_ids)) if got != want]
    if misplaced:
        problems.append(_describe_offenders("rows out of test order", misplaced))
    bad_letters = [(i, f"id {ids[i]!r} answer {answer!r}")
                   for i, answer in enumerate(answers) if answer not in alphabet]
    if bad_letters:
        problems.append(_describe_offenders(f"answers not in {', '.join(alphabet)}", bad_letters))
    return problems


def validate_submission(sub_df, test_ids, alphabet=OPTION_LETTERS):
    """Raise SubmissionError unless sub_df is exactly (id, answer) rows for test_ids, in order."""
    if tuple(sub_df.columns) != SUBMISSION_COLUMNS:
        raise SubmissionError(f"submission columns must be exactly {list(SUBMISSION_COLUMNS)}, "
                              f"got {list(sub_df.columns)}")
    ids = [str(value) for value in sub_df["id"]]
    problems = _submission_problems(ids, list(sub_df["answer"]),
                                    [str(value) for value in test_ids], tuple(alphabet))
    if problems:
        raise SubmissionError("invalid submission: " + "\n  ".join(problems))


def read_sample_submission(sample_submission_path, test_ids):
    """(column names, ids in the sample's order) of sample_submission.csv, checked against test_ids.

    Read before the first fold, so a wrong file stops the run in seconds, not after the training. Kaggle
    matches a submission to its answers by id, so the same ids in another order are accepted and the
    submission is written in the sample's order; other ids, duplicates or another shape are refused."""
    sample = pd.read_csv(sample_submission_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if len(sample.columns) != 2:
        raise SubmissionError(f"{sample_submission_path}: expected 2 columns (id, answer), got "
                              f"{list(sample.columns)}. Fix: use the competition's sample_submission.csv")
    sample_ids = sample.iloc[:, 0].str.strip().tolist()
    test_ids = [str(value).strip() for value in test_ids]
    duplicated = pd.Series(sample_ids).duplicated(keep=False)
    problems = []
    if duplicated.any():
        problems.append(_describe_offenders("rows with duplicate ids",
                                            [(i, f"id {sample_ids[i]!r}") for i in duplicated[duplicated].index]))
    known = set(test_ids)
    extra = [(i, f"id {value!r}") for i, value in enumerate(sample_ids) if value not in known]
    if extra:
        problems.append(_describe_offenders("ids that test.csv does not have", extra))
    listed = set(sample_ids)
    missing = [value for value in test_ids if value not in listed]
    if missing:
        problems.append(f"{len(missing)} test.csv ids it does not list (e.g. {', '.join(map(repr, missing[:5]))})")
    if problems:
        raise SubmissionError(f"{sample_submission_path}: does not match test.csv: " + "\n  ".join(problems)
                              + "\nFix: the sample submission and test.csv must come from the same competition "
                                "data (same ids); remove sample_submission.csv to write id,answer without it")
    return tuple(sample.columns), sample_ids


def _write_csv_atomically(frame, out_path):
    def write(temp_name):
        with open(temp_name, "w", encoding="utf-8", newline="") as stream:
            frame.to_csv(stream, index=False, lineterminator="\n")
            stream.flush()
            os.fsync(stream.fileno())

    atomic_write(out_path, write)


def write_submission(answers, test_ids, out_path, sample_submission_path=None):
    """Validate the (id, answer) table, then write it atomically as utf-8 CSV; return the path."""
    test_ids = [str(value).strip() for value in test_ids]
    answers = list(answers)
    if len(answers) != len(test_ids):
        raise SubmissionError(f"{len(answers)} answers for {len(test_ids)} test ids")
    submission = pd.DataFrame({"id": test_ids, "answer": answers})
    validate_submission(submission, test_ids)
    if sample_submission_path is not None:
        columns, sample_ids = read_sample_submission(sample_submission_path, test_ids)
        if sample_ids != test_ids:  # the same ids in the sample's order (read_sample_submission checked the set)
            submission = submission.set_index("id").loc[sample_ids].reset_index()
            validate_submission(submission, sample_ids)
        submission.columns = columns
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_csv_atomically(submission, out_path)
    logging.getLogger("mcvqa").info("wrote %s (%d rows)", out_path, len(submission))
    return out_path
