import os

import pandas as pd
import pytest

from mcvqa.core.submission import SubmissionError, read_sample_submission, validate_submission, write_submission

TEST_IDS = ["t1", "t2", "t3", "t4"]


def frame(ids, answers):
    return pd.DataFrame({"id": ids, "answer": answers})


def test_valid_submission_passes():
    validate_submission(frame(TEST_IDS, ["a", "b", "c", "d"]), TEST_IDS)


def test_wrong_columns_rejected():
    wrong = pd.DataFrame({"id": TEST_IDS, "label": ["a"] * 4})
    with pytest.raises(SubmissionError, match=r"exactly \['id', 'answer'\].*'label'"):
        validate_submission(wrong, TEST_IDS)
    extra = frame(TEST_IDS, ["a"] * 4).assign(score=1)
    with pytest.raises(SubmissionError, match="score"):
        validate_submission(extra, TEST_IDS)


def test_wrong_count_rejected():
    with pytest.raises(SubmissionError, match="has 3 rows but the test set has 4"):
        validate_submission(frame(TEST_IDS[:3], ["a"] * 3), TEST_IDS)


def test_wrong_order_rejected():
    swapped = ["t2", "t1", "t3", "t4"]
    with pytest.raises(SubmissionError) as error:
        validate_submission(frame(swapped, ["a"] * 4), TEST_IDS)
    message = str(error.value)
    assert "2 rows out of test order" in message
    assert "line 2: id 't2', test expects 't1'" in message


def test_duplicate_ids_rejected():
    with pytest.raises(SubmissionError, match=r"2 rows with duplicate ids \(line 2: id 't1'; "
                                              r"line 3: id 't1'\)"):
        validate_submission(frame(["t1", "t1", "t3", "t4"], ["a"] * 4), TEST_IDS)


def test_bad_letters_rejected_with_first_few_and_count():
    ids = [f"t{i}" for i in range(10)]
    answers = ["A", "e", None, "", "b", "1", "x", "y", "z", "c"]
    with pytest.raises(SubmissionError) as error:
        validate_submission(frame(ids, answers), ids)
    message = str(error.value)
    assert "8 answers not in a, b, c, d" in message
    assert "line 2: id 't0' answer 'A'" in message and "line 4: id 't2' answer nan" in message
    assert "3 more" in message and "'z'" not in message


def test_custom_alphabet():
    validate_submission(frame(["t1"], ["e"]), ["t1"], alphabet=("a", "b", "c", "d", "e"))


def test_write_submission_round_trip(tmp_path):
    out = write_submission(["a", "b", "c", "d"], TEST_IDS, tmp_path / "sub" / "submission.csv")
    assert out == tmp_path / "sub" / "submission.csv"
    assert out.read_bytes() == b"id,answer\nt1,a\nt2,b\nt3,c\nt4,d\n"  # no BOM, no index
    assert os.listdir(out.parent) == ["submission.csv"]


def test_write_submission_uses_sample_columns(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("\ufeffID,Answer\n" + "".join(f"{i},a\n" for i in TEST_IDS), encoding="utf-8")
    out = write_submission(["a", "b", "c", "d"], TEST_IDS, tmp_path / "submission.csv", sample)
    assert out.read_text(encoding="utf-8").splitlines()[0] == "ID,Answer"


def test_write_submission_rejects_sample_with_other_ids(tmp_path):
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("id,answer\nt1,a\nt9,a\nt2,a\nt4,a\nt4,a\n", encoding="utf-8")
    out = tmp_path / "submission.csv"
    with pytest.raises(SubmissionError, match="sample_submission.csv: does not match test.csv") as error:
        write_submission(["a"] * 4, TEST_IDS, out, sample)
    message = str(error.value)
    assert "line 3: id 't9'" in message  # an id test.csv does not have, at its spreadsheet line
    assert "line 5: id 't4'; line 6: id 't4'" in message  # a duplicate
    assert "1 test.csv ids it does not list (e.g. 't3')" in message
    assert not out.exists()


def test_sample_submission_in_another_order_gives_the_submission_in_its_order(tmp_path):
    """Kaggle matches rows by id: the same ids in another order are no error, and the file follows the sample."""
    sample = tmp_path / "sample_submission.csv"
    sample.write_text("id,answer\nt3,a\nt1,a\nt4,a\nt2,a\n", encoding="utf-8")
    assert read_sample_submission(sample, TEST_IDS) == (("id", "answer"), ["t3", "t1", "t4", "t2"])
    out = write_submission(["a", "b", "c", "d"], TEST_IDS, tmp_path / "submission.csv", sample)
    assert out.read_text(encoding="utf-8") == "id,answer\nt3,c\nt1,a\nt4,d\nt2,b\n"  # each id keeps its answer


def test_write_submission_wrong_answer_count(tmp_path):
    with pytest.raises(SubmissionError, match="3 answers for 4 test ids"):
        write_submission(["a"] * 3, TEST_IDS, tmp_path / "submission.csv")


def test_failed_validation_keeps_existing_file(tmp_path):
    out = write_submission(["a", "b", "c", "d"], TEST_IDS, tmp_path / "submission.csv")
    good = out.read_bytes()
    with pytest.raises(SubmissionError):
        write_submission(["a", "b", "c", "q"], TEST_IDS, out)
    assert out.read_bytes() == good
    assert os.listdir(tmp_path) == ["submission.csv"]


def test_crash_while_writing_keeps_existing_file_and_cleans_temp(tmp_path, monkeypatch):
    out = write_submission(["a", "b", "c", "d"], TEST_IDS, tmp_path / "submission.csv")
    good = out.read_bytes()

    def crash_midway(self, stream, **kwargs):
        stream.write("id,answer\nt1,")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash_midway)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_submission(["d", "c", "b", "a"], TEST_IDS, out)
    assert out.read_bytes() == good
    assert os.listdir(tmp_path) == ["submission.csv"]


def test_write_goes_through_same_folder_replace(tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def recording_replace(source, target):
        calls.append((os.path.dirname(source), os.fspath(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", recording_replace)
    out = write_submission(["a"] * 4, TEST_IDS, tmp_path / "submission.csv")
    assert calls == [(str(tmp_path), str(out))]
