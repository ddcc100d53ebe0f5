from __future__ import annotations

import json

import pytest

from bayeslora.tasks import TASKS, DatasetError, load_task
from bayeslora.tasks.hub import parse_hub_rows
from bayeslora.tasks.user import load_user_file

# row counts from ../shared/data/README.md
COUNTS = {
    ("arc-e", "train"): 2251, ("arc-e", "validation"): 570, ("arc-e", "test"): 2376,
    ("arc-c", "train"): 1119, ("arc-c", "validation"): 299, ("arc-c", "test"): 1172,
    ("obqa", "train"): 4957, ("obqa", "validation"): 500, ("obqa", "test"): 500,
    ("boolq", "train"): 2270, ("boolq", "validation"): 1000,
    ("wg-s", "train"): 640, ("wg-s", "validation"): 1267,
    ("wg-m", "train"): 2558, ("wg-m", "validation"): 1267,
}


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_release_files_parse_completely(data_dir, name, split):
    examples = load_task(name, split, data_dir)
    assert len(examples) == COUNTS[(name, split)]
    assert len({ex.id for ex in examples}) == len(examples)
    for ex in examples:
        assert 0 <= ex.label < ex.n_choices == len(ex.cloze)
        assert ex.prompt.endswith("Answer:")


def test_arc_variable_choices_and_numeric_labels(data_dir):
    examples = load_task("arc-c", "test", data_dir)
    counts = {n: sum(ex.n_choices == n for ex in examples) for n in (3, 4, 5)}
    assert counts == {3: 4, 4: 1165, 5: 3}
    raw = [json.loads(line) for line in (data_dir / "arc_challenge" / "test.jsonl").open()]
    numeric = [r for r in raw if r["question"]["choices"][0]["label"] == "1"]
    assert len(numeric) == 22
    by_id = {ex.id: ex for ex in examples}
    for r in numeric:
        ex = by_id[r["id"]]
        assert ex.label == int(r["answerKey"]) - 1
        assert "A) " in ex.prompt  # labels shown by position


def test_boolq_split_is_deterministic_and_disjoint(data_dir):
    train = load_task("boolq", "train", data_dir)
    val = load_task("boolq", "validation", data_dir)
    assert not {e.id for e in train} & {e.id for e in val}
    assert [e.id for e in load_task("boolq", "train", data_dir)] == [e.id for e in train]
    assert train[0].choices == ("no", "yes")
    with pytest.raises(DatasetError, match="no 'test' split"):
        load_task("boolq", "test", data_dir)


def test_winogrande_labels_and_cloze(data_dir):
    ex = load_task("wg-s", "train", data_dir)[0]
    assert ex.choices == ("Ian", "Dennis") and ex.label == 1
    (c1, k1), (c2, k2) = ex.cloze
    assert c1.endswith("because Ian") and c2.endswith("because Dennis") and k1 == k2 == " despised eating intestine."


def test_builtin_task_is_deterministic():
    a = load_task("arith", "train")
    assert len(a) >= 1000 and all(ex.n_choices == 4 for ex in a)
    assert [e.prompt for e in a[:5]] == [e.prompt for e in load_task("arith", "train")[:5]]
    assert a[0].prompt != load_task("arith", "validation")[0].prompt
    for ex in load_task("arith-ood", "validation", limit=50):
        q = ex.prompt.split("What is ")[1].split("?")[0]
        assert eval(q) == int(ex.choices[ex.label])  # noqa: S307 - our own generated arithmetic


def test_hub_rows_parse_like_release_files():
    arc = [{"id": "x1", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
            "answerKey": "2"}]
    (ex,) = parse_hub_rows("arc-e", arc)
    assert ex.label == 1 and ex.choices == ("a", "b", "c")
    obqa = [{"id": "o", "question_stem": "S", "choices": {"text": list("abcd"), "label": list("ABCD")},
             "answerKey": "D"}]
    assert parse_hub_rows("obqa", obqa)[0].label == 3
    boolq = [{"question": "is it", "passage": "P -- t", "answer": True}]
    assert parse_hub_rows("boolq", boolq)[0].choices[parse_hub_rows("boolq", boolq)[0].label] == "yes"
    wg = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}]
    assert parse_hub_rows("wg-m", wg)[0].label == 1


def test_user_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"question": "q1", "choices": ["a", "b", "c"], "answer": 2}\n'
                 '{"question": "q2", "choices": ["a", "b"], "answer": "B"}\n'
                 '{"question": "q3", "choices": ["x", "y"], "answer": "y"}\n')
    assert [e.label for e in load_task(str(j), "train")] == [2, 1, 1]
    c = tmp_path / "d.csv"
    c.write_text('"What, now?",a,b,c,d,C\nq2,1,2,3,4,A\n')
    examples = load_user_file(c)
    assert examples[0].choices == ("a", "b", "c", "d") and examples[0].label == 2
    assert "What, now?" in examples[0].prompt


@pytest.mark.parametrize("line,match", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "2 to"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 5}', "outside"),
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"choices": ["a", "b"], "answer": 0}', "missing field 'question'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "Z"}', "neither"),
    ('not json', "invalid JSON"),
    ('[1, 2]', "JSON object"),
])
def test_user_jsonl_errors_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"question": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    with pytest.raises(DatasetError, match=match) as err:
        load_task(str(f), "train")
    assert f"{f}:2" in str(err.value)


def test_malformed_release_row_is_an_error(tmp_path):
    d = tmp_path / "arc_easy"
    d.mkdir()
    (d / "train.jsonl").write_text('{"id":"a","question":{"stem":"s","choices":[{"text":"x","label":"A"},'
                                   '{"text":"y","label":"B"}]},"answerKey":"C"}\n')
    with pytest.raises(DatasetError, match=r"train.jsonl:1: answerKey 'C'"):
        load_task("arc-e", "train", tmp_path)


def test_unknown_dataset_and_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="Unknown dataset"):
        load_task("nope", "train")
    monkeypatch.delenv("BAYESLORA_DATA", raising=False)
    with pytest.raises(DatasetError, match="BAYESLORA_DATA"):
        load_task("arc-e", "train")
    assert "arith" in TASKS and "wg-m" in TASKS


def test_csv_numbers_are_indices_even_where_a_choice_reads_the_same(tmp_path):
    """A CSV answer cell is a letter or a 0-based index (every cell is a string); "1" is the second choice even when
    a choice's text is "1". In JSONL a string answer that is a choice's text stays that choice."""
    c = tmp_path / "num.csv"
    c.write_text("Which number?,1,2,3,1\nAnd now?,0,1,2,B\n")
    assert [e.label for e in load_task(c)] == [1, 1]
    j = tmp_path / "num.jsonl"
    j.write_text('{"question": "q", "choices": ["1", "2", "3"], "answer": "1"}\n')
    assert [e.label for e in load_task(j)] == [0]


def test_user_files_encoding_paths_and_limit(tmp_path):
    bom = tmp_path / "excel.csv"
    bom.write_bytes("\ufeffWhat is it?,a,b,A\n".encode("utf-8"))
    assert load_task(bom)[0].prompt.startswith("Question: What is it?")  # pathlib.Path accepted, BOM dropped
    latin = tmp_path / "latin.csv"
    latin.write_bytes("ok,a,b,A\nCaf\xe9?,a,b,A\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=rf"{latin}:2: not UTF-8"):
        load_task(latin)
    with pytest.raises(DatasetError, match="positive int"):
        load_task("arith", "validation", limit=-1)
