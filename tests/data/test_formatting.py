"""Chat formatting and prompt encoding (jaxdefense.data.formatting), and its place in the layering."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import jaxdefense
from jaxdefense.data import PLAIN_TEMPLATE, apply_chat, encode_prompts, format_prompt
from jaxdefense.data.formatting import uses_chat_template

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PACKAGE = Path(jaxdefense.__file__).parent


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chat_tok")
    tiny_tokenizer.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_plain_template(tiny_tokenizer):
    tok = tiny_tokenizer
    assert not uses_chat_template(tok, "chat")
    assert apply_chat(tok, "Bake bread?") == "### Instruction:\nBake bread?\n\n### Response:\n"
    assert apply_chat(tok, "Bake bread?", "Knead.") == "### Instruction:\nBake bread?\n\n### Response:\nKnead.</s>"
    assert format_prompt(tok, "Bake bread?", "chat") == format_prompt(tok, "Bake bread?", "plain") \
        == PLAIN_TEMPLATE.format(prompt="Bake bread?")


def test_chat_template_prompt_is_prefix_of_conversation(chat_tokenizer):
    tok = chat_tokenizer
    head, full = apply_chat(tok, "hello"), apply_chat(tok, "hello", "world")
    assert head == "<|user|>\nhello<|end|>\n<|assistant|>\n"
    assert full == head + "world<|end|>\n"
    assert format_prompt(tok, "hello", "chat") == head
    assert format_prompt(tok, "hello", "plain") == PLAIN_TEMPLATE.format(prompt="hello")
    assert uses_chat_template(tok, "chat") and not uses_chat_template(tok, "plain")


def test_encode_prompts_left_pads(tiny_tokenizer, chat_tokenizer):
    tok = tiny_tokenizer
    ids, mask = encode_prompts(tok, ["hello", "how do I bake bread"], chat=False)
    assert ids.shape == mask.shape and ids.dtype == mask.dtype == "int32"
    short = int(mask[0].sum())
    assert 0 < short < ids.shape[1]
    assert (mask[0, -short:] == 1).all() and (mask[0, :-short] == 0).all() and mask[1].all()
    assert (ids[0, :-short] == tok.pad_token_id).all()
    assert ids[1, 0] == tok.bos_token_id  # plain text gets the tokenizer's BOS
    assert tok.decode(ids[1][mask[1] > 0].tolist(), skip_special_tokens=True) == "how do I bake bread"
    chat_ids, chat_mask = encode_prompts(chat_tokenizer, [apply_chat(chat_tokenizer, "hello")])
    assert chat_ids[0, 0] != chat_tokenizer.bos_token_id  # the formatted text carries its own specials
    assert chat_tokenizer.decode(chat_ids[0].tolist()) == apply_chat(chat_tokenizer, "hello")
    assert encode_prompts(tok, ["hi", "hello there"], chat=False, pad_id=7)[0][0, 0] == 7


def test_one_plain_template_in_the_package():
    defining = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                      if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PLAIN_TEMPLATE"
                                                                  for t in node.targets)
                             for node in ast.walk(ast.parse(p.read_text()))))
    assert defining == ["data/formatting.py"]


def test_data_never_imports_models():
    """No module of jaxdefense/data imports jaxdefense.models, at top level or inside a function."""
    offenders = []
    for path in (PACKAGE / "data").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("jaxdefense.models")]
    assert offenders == []
    out = subprocess.run([sys.executable, "-c", "import sys, jaxdefense.data; "
                          "print(sorted(m for m in sys.modules if m.startswith('jaxdefense.models')))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # SmolLM2's


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("chatml_tok")
    tiny_tokenizer.save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML
    return tok


def test_chatml_loss_mask_covers_the_response_only(chatml_tokenizer):
    """Training rows under ChatML: prompt = system + user turn + assistant header (the template's own
    specials, no BOS added), targets = the response tokens + <|im_end|>; a literal "<|im_end|>" inside
    the response stays text; eval prompts encode to the same head ids."""
    from jaxdefense.data.batching import encode_example, prompt_ids

    tok = chatml_tokenizer
    user, answer = "How do I bake bread?", "Mix flour and water. <|im_end|> is text here."
    head = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    assert head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert format_prompt(tok, user) == head and uses_chat_template(tok, "chat")
    head_ids = tok(head, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, user) == head_ids
    ex = encode_example(tok, user, answer, max_len=512)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tok(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert im_end not in answer_ids  # the literal marker is split into ordinary tokens
    assert list(ex.input_ids) == head_ids + answer_ids + [im_end]
    assert ex.loss_mask == (0,) * len(head_ids) + (1,) * (len(answer_ids) + 1)
    targets = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert tok.decode(targets, skip_special_tokens=False).endswith("is text here.<|im_end|>")
    ids, mask = encode_prompts(tok, [format_prompt(tok, user), format_prompt(tok, "Hi")])
    assert ids[0].tolist() == head_ids and mask[0].all() and ids[1, -1] == head_ids[-1]
    cut = encode_example(tok, user * 40, answer, max_len=64)  # the prompt shrinks from the left; header kept
    assert len(cut.input_ids) == 64 and cut.input_ids[-len(answer_ids) - 1:] == tuple(answer_ids + [im_end])
    assert sum(cut.loss_mask) == len(answer_ids) + 1
