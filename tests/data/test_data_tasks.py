import pytest

from jaxdefense.data import TASKS, accuracy, gsm8k_final_number, mc_accuracy, mc_pairs
from jaxdefense.data.tasks import first_class_mentioned
from jaxdefense.errors import DataError


@pytest.mark.parametrize("text,number", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("The answer is $5.50.", "5.5"),
    ("so -3 degrees #### -3.0", "-3"),
    ("first 12 then 7, so the answer is 7.", "7"),
    ("#### no number here", None),
    ("no digits", None),
])
def test_gsm8k_final_number(text, number):
    assert gsm8k_final_number(text) == number


def test_classification_scoring_takes_the_first_class_named():
    assert first_class_mentioned("Positive, not negative", ("negative", "positive")) == "positive"
    assert first_class_mentioned("it is NEGATIVE.", ("negative", "positive")) == "negative"
    assert first_class_mentioned("nonpositive", ("negative", "positive")) is None
    assert first_class_mentioned("Sci/Tech news", ("World", "Sports", "Business", "Sci/Tech")) == "Sci/Tech"
    records = [{"target": "positive"}, {"target": "negative"}, {"target": "negative"}]
    assert accuracy("sst2", ["positive", "Negative!", "positive"], records) == pytest.approx(2 / 3)
    with pytest.raises(DataError):
        accuracy("sst2", ["positive"], records)
    with pytest.raises(DataError):
        accuracy("nope", [], [])


def test_task_records_are_built_from_templates():
    record = {"sentence": "a gripping film", "label": 1}
    assert TASKS["sst2"].format_prompt(record).endswith("Input: a gripping film")
    assert TASKS["sst2"].target(record) == "positive"
    gsm = {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}
    assert TASKS["gsm8k"].target(gsm) == "4" and TASKS["gsm8k"].response(gsm) == gsm["answer"]
    assert TASKS["gsm8k"].accuracy(["... #### 4", "the answer is 5"], [{"target": "4"}, {"target": "4"}]) == 0.5


def test_mc_pairs_and_accuracy():
    wino = {"question": "Sarah was a better surgeon than Maria so _ got the easier cases.", "choices": ["Sarah", "Maria"], "answer": 1}
    assert mc_pairs("winogrande", wino) == [
        ("Sarah was a better surgeon than Maria so Sarah", " got the easier cases."),
        ("Sarah was a better surgeon than Maria so Maria", " got the easier cases."),
    ]
    arc = {"question": "Which is a planet?", "choices": ["Mars", "Moon"], "answer": 0}
    assert mc_pairs("arc_easy", arc) == [("Question: Which is a planet?\nAnswer:", " Mars"), ("Question: Which is a planet?\nAnswer:", " Moon")]
    assert mc_accuracy([[-1.0, -2.0], [-3.0, -0.5]], [arc, wino]) == 1.0
    assert mc_accuracy([[-1.0, -1.0]], [wino]) == 0.0  # ties go to the first choice
    with pytest.raises(DataError):
        mc_accuracy([[-1.0]], [arc])
