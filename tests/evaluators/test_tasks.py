"""Task files: every ../shared/data format loads into lm-eval's prompts, and bad files name the file and line."""

import json

import pytest

from compress.recipe.errors import UserError
from compress.evaluators.tasks import registry
from compress.evaluators.tasks.generic import read_docs
from compress.evaluators.zero_shot import load_task
from tests.conftest import SHARED_DATA, requires_shared_data

# task -> (documents in the full file, first document's gold, first context's start, first continuation)
EXPECTED = {
    "piqa": (1838, 0, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", " Provide the guinea pig"),
    "arc_easy": (2376, 0, "Question: Which statement best explains why photosynthesis", " Sunlight is the source"),
    "arc_challenge": (1172, 2, "Question: An astronomer observes that a planet rotates faster", " Planetary density"),
    "hellaswag": (10042, 3, "Roof shingle removal: A man is sitting on a roof. he", " is using wrap"),
    "winogrande": (1267, 1, "Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    "boolq": (3270, None, "All biomass goes through at least some of these steps", None),
    "lambada_openai": (5153, 0, "In my palm is a clear stone, and inside it is a small ivory statuette.", " signs"),
}


@requires_shared_data("piqa", "valid.jsonl")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_data_formats_load_with_lm_eval_templates(name):
    count, gold, context_start, continuation_start = EXPECTED[name]
    task = load_task(name, SHARED_DATA)
    assert len(task.docs) == count and task.source.startswith(str(SHARED_DATA))
    first = task.docs[0]
    assert first.requests[0][0].startswith(context_start)
    if gold is not None:
        assert first.gold == gold
    if continuation_start is not None:
        assert first.requests[0][1].startswith(continuation_start)
    if registry()[name].output == "multiple_choice":
        # lm-eval scores delimiter + choice; acc_norm divides by the choice (or, for winogrande, the context) alone
        for context, continuation in first.requests:
            assert continuation.startswith(" ")
        assert len(first.norm_texts) == len(first.requests)


@requires_shared_data("boolq", "boolq.jsonl")
def test_boolq_prompt_matches_lm_eval():
    doc = load_task("boolq", SHARED_DATA, limit=1).docs[0]
    context = doc.requests[0][0]
    assert not context.startswith("Passage: ") and "\nQuestion: " in context and context.endswith("?\nAnswer:")
    assert [c for _, c in doc.requests] == [" no", " yes"] and doc.norm_texts == ("no", "yes")


@requires_shared_data("winogrande", "winogrande.jsonl")
def test_winogrande_partial_scoring_shares_the_suffix():
    doc = load_task("winogrande", SHARED_DATA, limit=1).docs[0]
    (ctx0, cont0), (ctx1, cont1) = doc.requests
    assert cont0 == cont1 == " always got the easier cases."
    assert ctx0.endswith("so Sarah") and ctx1.endswith("so Maria") and doc.norm_texts == (ctx0, ctx1)


@pytest.mark.parametrize("text", [" Making a cake [title] Mix the flour.  [step] Stir. ", "[header] How to x [title] Y.",
                                  "plain text", "a  b   c [substeps] d"])
def test_hellaswag_preprocessing_is_lm_evals(text):
    from compress.evaluators.tasks.hellaswag import preprocess

    lm_eval_utils = pytest.importorskip("lm_eval.tasks.hellaswag.utils")
    assert preprocess(text) == lm_eval_utils.preprocess(text)
    assert preprocess(" Making a cake [title] Mix the flour. [step] Stir. ") == "Making a cake. Mix the flour. Stir."


def test_limit_takes_the_first_documents(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"context": f"c{i}", "choices": ["a", "b"], "gold": i % 2}) + "\n" for i in range(5)))
    task = load_task(str(path), None, limit=3)
    assert [d.gold for d in task.docs] == [0, 1, 0] and task.name == "mine"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "x", "choices": ["a"], "gold": 1}', r"mine.jsonl:2: 'gold' is 1, but there are only 1 choices"),
        ('{"context": "x", "choices": "ab", "gold": 0}', r"mine.jsonl:2: field 'choices' should be list, got str"),
        ('{"choices": ["a", "b"], "gold": 0}', r"mine.jsonl:2: missing field 'context'"),
        ('{"context": "x", "choices": ["a", "b"], "gold": true}', r"mine.jsonl:2: field 'gold' should be int, got bool"),
        ('{"context": "x", "choices": ["a", 2], "gold": 0}', r"mine.jsonl:2: field 'choices' should be a non-empty list of strings"),
        ('{"context": "x", "choices": ["a", "b"], "gold": 0', r"mine.jsonl:2: not valid JSON"),
        ('["context"]', r"mine.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_malformed_generic_task_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "gold": 0}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        read_docs(path)


def test_missing_task_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"task file not found: .*nope.jsonl"):
        load_task(str(tmp_path / "nope.jsonl"), None)
    with pytest.raises(UserError, match=r"task 'piqa': file not found: .*piqa/valid.jsonl"):
        load_task("piqa", tmp_path)
    with pytest.raises(UserError, match="offline mode is on"):
        load_task("piqa", None)


def test_malformed_builtin_formats_name_the_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g", "sol1": "a"}\n')
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(UserError, match=r"piqa/valid.jsonl:2: missing field 'sol2'"):
        load_task("piqa", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text("Label: ctx\n7\na\nb\nc\nd\n")
    with pytest.raises(UserError, match=r"hellaswag_val_full.txt:2: expected the gold ending index 0-3"):
        load_task("hellaswag", tmp_path)
