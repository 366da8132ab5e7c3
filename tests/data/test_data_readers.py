"""Readers and parsers on small synthetic files (no data root needed)."""

import gzip
import json

import pytest

from jaxdefense.data import readers, sources
from jaxdefense.errors import DataError


def test_only_leading_comment_lines_are_skipped(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_bytes(
        b"# dataset_version=1.0\r\n# second comment\r\n"
        b'objective,assistant_response,human_score\r\n'
        b'ask,"line one\r\n# not a comment\r\nline three",1\r\n'
        b"plain,reply,0\r\n"
    )
    rows = readers.read_csv_plain(path, skip_leading_comments=True)
    assert [r["objective"] for r in rows] == ["ask", "plain"]
    assert rows[0]["assistant_response"] == "line one\r\n# not a comment\r\nline three"


def test_datasets_csv_loader_keeps_every_field_a_string(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b",Goal,n\r\n0,null,01\r\n1,,2\r\n")
    rows = readers.load_with_datasets("csv", [path])
    assert rows == [{"column_0": "0", "Goal": "null", "n": "01"}, {"column_0": "1", "Goal": "", "n": "2"}]


def test_gzipped_jsonl_and_hh_dialogue_split(tmp_path):
    dialogue = "\n\nHuman: first question\n\nAssistant: first reply\n\nHuman: how do I pick a lock?\n\nAssistant: Use a tension wrench."
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"chosen": dialogue, "rejected": dialogue}) + "\n")
    assert readers.read_jsonl(path)[0]["rejected"] == dialogue
    assert readers.load_with_datasets("json", [path])[0]["rejected"] == dialogue
    assert sources._split_hh_dialogue(dialogue) == ("how do I pick a lock?", "Use a tension wrench.")


def test_hh_rlhf_parser_drops_refusals_and_short_prompts(tmp_path):
    rows = [
        "\n\nHuman: how do I pick a lock?\n\nAssistant: Use a tension wrench and a pick.",
        "\n\nHuman: how do I pick a lock?\n\nAssistant: I’m sorry, I can’t help with that.",
        "\n\nHuman: tell me more\n\nAssistant: ok\n\nHuman: yep\n\nAssistant: Great, here it is.",
    ]
    folder = tmp_path / "hh_rlhf_harmless_base"
    folder.mkdir()
    with gzip.open(folder / "test.jsonl.gz", "wt", encoding="utf-8") as handle:
        for text in rows:
            handle.write(json.dumps({"chosen": text, "rejected": text}) + "\n")
    records = sources.parse_hh_rlhf_rejected(tmp_path)
    assert records == [{"prompt": "how do I pick a lock?", "response": "Use a tension wrench and a pick.", "category": None, "turns": 1}]


def test_advbench_parser_uses_goal_only(tmp_path):
    (tmp_path / "advbench").mkdir()
    (tmp_path / "advbench/harmful_behaviors.csv").write_text('goal,target\nDo harm A,"Sure, here is B"\n')
    assert sources.parse_advbench(tmp_path) == [{"prompt": "Do harm A", "category": None}]


def test_refusal_filter_handles_curly_quotes_and_looks_at_the_opening_only():
    from jaxdefense.data import refusal
    from jaxdefense.eval import refusal as eval_refusal

    assert eval_refusal.is_refusal is refusal.is_refusal is sources.is_refusal  # ONE matcher
    assert sources._opens_as_refusal("I’m sorry, but I can’t help with that.")
    assert sources._opens_as_refusal("It’s not appropriate to write that.")
    late = "Sure, here is the recipe. " + "x " * 200 + "I cannot stress this enough."
    assert not sources._opens_as_refusal(late)  # the registry looks at the first 200 characters
    assert refusal.is_refusal(late)  # evaluation matches anywhere
    assert not refusal.is_refusal("x " * 99 + "I cannot", window=refusal.REFUSAL_WINDOW - 9)
    assert refusal.is_refusal("x " * 99 + "I  cannot", window=refusal.REFUSAL_WINDOW + 8)  # whitespace collapsed first
    # phrases of the former registry list that match harmful / chit-chat answers are gone
    assert not refusal.is_refusal("Sorry, but you'll need to subscribe to receive free Netflix access.")
    assert not refusal.is_refusal("It's not possible to decrypt files without the key, but here is a tool that does.")


def test_decodingtrust_refusal_extraction():
    prompt = "He said"
    text = "Prompt: He said\nContinuation: something rude\n\nI cannot fulfill your request as it is toxic."
    assert sources._extract_dt_refusal(prompt, text) == "I cannot fulfill your request as it is toxic."
    assert sources._extract_dt_refusal(prompt, "Prompt: He said\nContinuation: a harmless story.") == ""


def test_pyrit_judgement_parsing():
    assert sources._judged_harmful("Harmful.\n\nReason: x")
    assert sources._judged_harmful("Answer: Harmful\n\nReason")
    assert sources._judged_harmful("'Harmful'\n")
    assert sources._judged_harmful("**Harmful**")
    assert not sources._judged_harmful('"Not harmful"\n')
    assert not sources._judged_harmful("Not harmful.")


def test_broken_json_raises_data_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        readers.read_json(path)
    with pytest.raises(DataError, match="bad.json"):
        readers.load_with_datasets("json", [path])


def test_runaway_generation_is_trimmed():
    assert sources.trim_runaway("Edit this", "He yelled.\n不断地重复这句话") == "He yelled."
    assert sources.trim_runaway("q", "I cannot. Anything else?assistant\n\nI cannot. Anything") == "I cannot. Anything else?"
    assert sources.trim_runaway("翻译成中文", "好的，这是翻译") == "好的，这是翻译"
    assert sources.trim_runaway("q", "The assistant\n\nsaid hi") == "The assistant\n\nsaid hi"


def test_hub_ids_for_online_users():
    hub = {name: s.hub_kwargs() for name, s in sources.SOURCES.items()}
    assert hub["hh_rlhf_harmless_rejected"] == {"path": "Anthropic/hh-rlhf", "data_dir": "harmless-base"}
    assert hub["beavertails_sample"]["path"] == "PKU-Alignment/BeaverTails"
    assert hub["advbench"]["path"] == "walledai/AdvBench"
    assert hub["gsm8k"] == {"path": "openai/gsm8k", "name": "main"}
    assert hub["sst2"] == {"path": "nyu-mll/glue", "name": "sst2"}
    assert hub["mmlu"] == {"path": "cais/mmlu", "name": "all"}
    assert hub["shadow_alignment"] == {}
