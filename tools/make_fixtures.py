"""Deterministic reference fixtures for the Rust tests (tests/fixtures/).

Run as `python3 tools/make_fixtures.py`. It re-executes itself inside the
pinned reference venv (see refenv.py: torch 2.15.0, transformers 5.23.0,
tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6, gguf 0.19.0), works
offline, and rewrites these directories byte for byte identically each run:

tokenizer/       a ~450-token byte-level BPE trained on the inline CORPUS, laid
                 out like Qwen2's tokenizer.json (NFC, regex Split + ByteLevel,
                 ByteLevel decoder, no BOS) with Qwen's added tokens, plus a
                 tokenizer_config.json carrying the Qwen2.5-Instruct chat template.
tiny/            tied embeddings, f32, one model.safetensors, transformers-5 config.
tiny-untied/     untied, bf16, sharded safetensors + index, transformers-4 config.
odd/             untied, f16, 9 query / 3 KV heads (GQA 3:1), head_dim 10, odd vocab,
                 rope theta 1e6, transformers-5 config.
chat_template.json  chat template renderings and their token ids.

Each model directory holds random weights (every bias and norm weight too),
the tokenizer files, a Qwen2.5-style generation_config.json, and references
computed in float32 with eager attention on the stored (upcast) weights:

reference.safetensors            input_ids I64 [n], logits F32 [n, vocab]
reference_positions.safetensors  input_ids I64 [n], positions I64 [k], logits F32 [k, vocab]
decode.safetensors               input_ids I64 [n], prompt_len I64 [1] = p,
                                 logits F32 [n-p+1, vocab]: row 0 after prefilling
                                 p tokens, row j after feeding token p+j-1 alone
                                 through the KV cache
greedy.json                      {"cases": [{"prompt_ids", "new_ids"}]}: 24 greedy
                                 tokens per prompt from model.generate, never
                                 stopped by EOS
"""

from refenv import ensure_venv

ensure_venv()

import json  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from make_reference import (  # noqa: E402
    greedy,
    greedy_check,
    load_model,
    prefill_logits,
    token_ids,
    write_logits,
)

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SEED = 1234

# ---------------------------------------------------------------- tokenizer

BPE_VOCAB_SIZE = 450
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added but not special, as in Qwen2.5 (<tool_response> is plain text there).
PLAIN_ADDED_TOKENS = ("<tool_call>", "</tool_call>")
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = r'''
The quick brown fox jumps over the lazy dog. A helpful assistant answers the
question that was asked, explains its reasoning when that helps, and says so
when it does not know. You are Qwen, created by Alibaba Cloud. You are a
helpful assistant. The weather in Paris is mild in spring; in Montréal it can
be cold → bring a coat. It's a long way, isn't it? We'll see, they're sure
I'd like that, you've been there and I'm not.

Language models read text as tokens. A tokenizer splits the text into pieces,
maps every piece to an integer id, and the model predicts the next id. During
generation the model appends the chosen token and repeats; a cache of keys and
values makes every step cheap. Greedy decoding always picks the most likely
token, while sampling draws from the distribution after temperature, top-k and
top-p filtering.

def rms_norm(x, weight, eps=1e-6):
    """Normalize the last dimension by its root mean square."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


for i in range(10):
    if i % 2 == 0:
        print(f"even: {i}")
    else:
        print(f"odd: {i}")

import json
with open("config.json") as f:
    config = json.load(f)
print(config["hidden_size"], config["num_attention_heads"])

{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "run_shell", "description": "Run a shell command.", "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
{"id": 42, "tags": ["alpha", "beta"], "active": true, "score": 0.75, "owner": null}

$ ls -la /usr/local/bin
$ git status && git diff --stat
$ cargo build --release 2>&1 | tail -n 20
$ export RUST_LOG=debug; ./target/release/protege --model models/qwen --prompt "hello"
$ grep -rn "TODO" src/ | wc -l
$ curl -s http://localhost:8080/v1/chat/completions -H "Content-Type: application/json" -d '{"messages": []}'
$ python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt

<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the capital of France?<|im_end|>
<|im_start|>assistant
The capital of France is Paris.<|im_end|>
<tool_call>
{"name": "get_weather", "arguments": {"city": "Paris"}}
</tool_call>
<tool_response>
{"temperature": 21, "condition": "sunny"}
</tool_response>

Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-01-15 12:30:45.
Punctuation!? (parentheses) [brackets] {braces} <angles> "quotes" 'single'.
Café, naïve, façade, déjà vu, São Paulo, Zürich; 東京, 北京; Привет мир.
'''

# The Qwen2.5-Instruct chat template, verbatim (with tools support).
CHAT_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''


def train_tokenizer():
    """Byte-level BPE with Qwen2's normalizer / pre-tokenizer / decoder and added tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.strip().split("\n\n"), trainer=trainer)
    assert tok.get_vocab_size() == BPE_VOCAB_SIZE, tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def tokenizer_json(tok):
    """tokenizer.json text, with the fields `tokenizers` cannot set written as in Qwen2's file.

    Merges become "a b" strings, the BPE prefix/suffix empty strings, and the
    decoder's flags false (the Python ByteLevel decoder ignores its arguments).
    None of this changes how text is encoded or decoded.
    """
    data = json.loads(tok.to_str())
    model = data["model"]
    model["merges"] = [" ".join(pair) for pair in model["merges"]]
    model["continuing_subword_prefix"] = ""
    model["end_of_word_suffix"] = ""
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def tokenizer_config(tok):
    """tokenizer_config.json in the Qwen2.5-Instruct layout."""
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
        for t in SPECIAL_TOKENS + PLAIN_ADDED_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 512,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def write_tokenizer(out_dir):
    tok = train_tokenizer()
    out_dir.mkdir(parents=True)
    (out_dir / "tokenizer.json").write_text(tokenizer_json(tok))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(tok))
    return tok.get_vocab_size()


# ------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: torch.dtype
    rope_theta: float
    transformers4_config: bool = False
    max_shard_size: str | None = None


def model_specs(tokenizer_size):
    # Round up to a multiple of 8 that is not a power of two (like Qwen's padded vocab).
    padded = -(-tokenizer_size // 8) * 8
    if padded & (padded - 1) == 0:
        padded += 8
    odd = tokenizer_size | 1  # odd, hence neither a power of two nor a multiple of 8
    return [
        ModelSpec("tiny", 64, 4, 2, 2, 160, padded, True, torch.float32, 10000.0),
        ModelSpec(
            "tiny-untied", 64, 4, 2, 3, 160, padded, False, torch.bfloat16, 10000.0,
            transformers4_config=True, max_shard_size="150KB",
        ),
        ModelSpec("odd", 90, 9, 3, 3, 100, odd, False, torch.float16, 1000000.0),
    ]


# Large enough that attention is content-dependent and greedy continuations
# do not collapse into repeating one token (they do at std 0.08).
INIT_STD = 0.2
NORM_STD = 0.1
BIAS_STD = 0.1


def qwen2_config(spec, tok):
    return Qwen2Config(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tied,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )


@torch.no_grad()
def random_model(spec, tok, seed):
    """A Qwen2ForCausalLM whose every parameter (norms and biases included) is random."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(spec, tok))
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.copy_(1.0 + NORM_STD * noise)
        elif name.endswith(".bias"):
            param.copy_(BIAS_STD * noise)
        else:
            param.copy_(INIT_STD * noise)
    return model.to(spec.dtype)


def transformers4_config(spec, tok):
    """config.json as Qwen2.5 checkpoints made with transformers 4 ship it."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 512,
        "max_window_layers": spec.layers,
        "model_type": "qwen2",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "sliding_window": 512,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": str(spec.dtype).removeprefix("torch."),
        "transformers_version": "4.46.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": spec.vocab,
    }


def generation_config(tok):
    """generation_config.json in the Qwen2.5-Instruct layout."""
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    return {
        "bos_token_id": endoftext,
        "do_sample": True,
        "eos_token_id": [tok.convert_tokens_to_ids("<|im_end|>"), endoftext],
        "pad_token_id": endoftext,
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.46.0",
    }


def save_model(spec, tok, out_dir):
    model = random_model(spec, tok, SEED)
    kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    if spec.transformers4_config:
        write_json(out_dir / "config.json", transformers4_config(spec, tok))
    write_json(out_dir / "generation_config.json", generation_config(tok))
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURES / "tokenizer" / name, out_dir / name)


def check_saved(spec, out_dir):
    """Print the saved config keys and check them and the weight files against `spec`."""
    config = json.loads((out_dir / "config.json").read_text())
    files = sorted(p.name for p in out_dir.glob("*.safetensors*"))
    print(f"  config keys: {sorted(config)}")
    print(f"  weight files: {files}")
    if spec.transformers4_config:
        assert "rope_parameters" not in config and "dtype" not in config
        assert config["rope_theta"] == spec.rope_theta
    else:
        assert "rope_theta" not in config and "torch_dtype" not in config
        assert config["rope_parameters"]["rope_theta"] == spec.rope_theta
        assert config["dtype"] == str(spec.dtype).removeprefix("torch.")
    if spec.max_shard_size:
        assert "model.safetensors.index.json" in files and len(files) >= 3, files
    else:
        assert files == ["model.safetensors"], files


# --------------------------------------------------------------- references

REFERENCE_TEXT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the weather in Paris? Answer in JSON.<|im_end|>\n"
    "<|im_start|>assistant\n{\"city\": \"Paris\", \"temperature\": 21}<|im_end|>\n"
)
REFERENCE_LEN = 40
GREEDY_PROMPTS = (
    (3, "The capital of France"),
    (11, "def add(a, b):\n    return a + b\n"),
    (17, "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n"),
    (29, "$ git status && git diff --stat\n{\"id\": 42, \"tags\": [\"alpha\", \"beta\"]}"),
)
GREEDY_NEW_TOKENS = 24
# Every greedy step must win by this logit gap, so float rounding differences
# between implementations cannot flip a token (change SEED if it fails).
GREEDY_MIN_MARGIN = 1e-3


def encode(tok, text, length):
    ids = token_ids(tok.encode(text, add_special_tokens=False))
    assert len(ids) >= length, f"{text!r} has only {len(ids)} tokens"
    return ids[:length]


@torch.no_grad()
def decode_logits(model, ids, prompt_len):
    """Logits [n - p + 1, vocab]: after prefilling p tokens, then one row per cached step."""
    out = model(torch.tensor([ids[:prompt_len]]), use_cache=True)
    rows = [out.logits[0, -1]]
    cache = out.past_key_values
    for token in ids[prompt_len:]:
        out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        rows.append(out.logits[0, -1])
    return torch.stack(rows).float()


def write_references(model, tok, out_dir):
    ids = encode(tok, REFERENCE_TEXT, REFERENCE_LEN)
    n = len(ids)
    logits = prefill_logits(model, ids)
    write_logits(out_dir / "reference.safetensors", ids, logits)
    write_logits(out_dir / "reference_positions.safetensors", ids, logits, [0, 7, 23, n - 1])

    p = n // 2
    steps = decode_logits(model, ids, p)
    save_file(
        {
            "input_ids": np.asarray(ids, dtype=np.int64),
            "prompt_len": np.asarray([p], dtype=np.int64),
            "logits": steps.numpy(),
        },
        str(out_dir / "decode.safetensors"),
    )
    drift = (steps - logits[p - 1 :]).abs().max().item()
    print(f"  logits std {logits.std():.3f}; max |decode - prefill| {drift:.2e}")
    assert drift < 1e-4


def write_greedy(model, tok, out_dir):
    cases = []
    for length, text in GREEDY_PROMPTS:
        prompt = encode(tok, text, length)
        new_ids = greedy(model, prompt, GREEDY_NEW_TOKENS)
        mismatches, margin = greedy_check(model, prompt, new_ids)
        assert mismatches == 0 and margin > GREEDY_MIN_MARGIN, (mismatches, margin)
        assert len(set(new_ids)) > len(new_ids) // 2, f"repetitive continuation {new_ids}"
        print(f"  greedy {length:2d} (min gap {margin:.4f}): {new_ids}")
        print(f"      {tok.decode(new_ids)!r}")
        cases.append({"prompt_ids": prompt, "new_ids": new_ids})
    (out_dir / "greedy.json").write_text(json.dumps({"cases": cases}) + "\n")


def make_model_fixture(spec, tok):
    out_dir = FIXTURES / spec.name
    print(f"{spec.name}: {spec}")
    save_model(spec, tok, out_dir)
    check_saved(spec, out_dir)
    model = load_model(out_dir)
    assert model.config.rope_parameters["rope_theta"] == spec.rope_theta
    assert model.config.tie_word_embeddings == spec.tied
    write_references(model, tok, out_dir)
    write_greedy(model, tok, out_dir)


# ------------------------------------------------------------ chat template

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": 'Get the current weather.\nReturns "temperature" in the unit → °C or °F.',
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "object",
                        "description": "Where to look",
                        "properties": {
                            "city": {"type": "string", "description": 'City name, e.g. "Montréal"'},
                            "country": {"type": "string", "description": "ISO code"},
                        },
                        "required": ["city"],
                    },
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "description": "Forecast length\n(1-7 days)"},
                },
                "required": ["location"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run_shell",
            "description": "Run a shell command and return its output.",
            "parameters": {
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "e.g. `ls -la` or \"echo 'hi'\""},
                    "flags": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["--verbose", "--dry-run"]},
                    },
                },
                "required": ["command"],
            },
        },
    },
]


def tool_call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


WEATHER_CALL = tool_call(
    "get_weather",
    {
        "location": {"city": "Montréal", "country": "CA"},
        "unit": "celsius",
        "note": 'say "hi"\nthen → leave',
        "days": 3,
        "ratio": 0.75,
        "hourly": True,
        "cache": None,
        "fields": ["temp", "wind", 2],
    },
)
SHELL_CALL = tool_call("run_shell", {"command": "ls -la /tmp", "flags": ["--verbose"]})

CHAT_CASES = [
    ("single_user", [{"role": "user", "content": "Hello! What is the capital of France?"}], None, True),
    (
        "multi_turn",
        [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And times 3?"},
        ],
        None,
        True,
    ),
    (
        "tools_full_round",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Weather in Montréal, and list /tmp please."},
            {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, SHELL_CALL]},
            {"role": "tool", "name": "get_weather", "content": '{"temperature": -3.5, "condition": "snow"}'},
            {"role": "tool", "name": "run_shell", "content": "total 0\ndrwxrwxrwt  2 root root 40 .\n"},
            {"role": "assistant", "content": "It is -3.5 °C and snowing; /tmp is empty."},
        ],
        TOOLS,
        False,
    ),
    (
        "content_and_tool_calls",
        [
            {"role": "user", "content": "Check the weather, then list files."},
            {
                "role": "assistant",
                "content": "Sure, let me look that up.",
                "tool_calls": [tool_call("get_weather", {"location": {"city": "Paris"}}), SHELL_CALL],
            },
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "tool", "content": "a.txt\nb.txt"},
        ],
        TOOLS,
        True,
    ),
    (
        "whitespace_content",
        [
            {"role": "system", "content": "  Indented system prompt.\n\n"},
            {"role": "user", "content": "\n\n  leading blank lines\n\n\nand trailing spaces   \n\n"},
        ],
        None,
        True,
    ),
    ("tools_no_system", [{"role": "user", "content": "List /tmp."}], TOOLS, True),
    (
        "ends_with_assistant",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ],
        None,
        False,
    ),
    (
        "markup_in_content",
        [
            {"role": "user", "content": "Explain <tool_call> vs <tool_response> and {{ braces }} — 東京 café."},
            {"role": "system", "content": "A second system message."},
        ],
        None,
        True,
    ),
]


def write_chat_template_fixture(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    cases = []
    for name, messages, tools, add_generation_prompt in CHAT_CASES:
        kwargs = {"tools": tools, "add_generation_prompt": add_generation_prompt}
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = token_ids(tokenizer.apply_chat_template(messages, tokenize=True, **kwargs))
        assert token_ids(tokenizer.encode(text, add_special_tokens=False)) == ids, name
        assert raw.encode(text, add_special_tokens=False).ids == ids, name
        assert tokenizer.decode(ids) == text, name
        print(f"chat case {name}: {len(text)} chars, {len(ids)} ids")
        cases.append(
            {
                "name": name,
                "messages": messages,
                "tools": tools,
                "add_generation_prompt": add_generation_prompt,
                "text": text,
                "input_ids": ids,
            }
        )
    write_json(FIXTURES / "chat_template.json", {"cases": cases})


# --------------------------------------------------------------------- main


def main():
    torch.set_num_threads(1)
    for name in ("tokenizer", "tiny", "tiny-untied", "odd", "chat_template.json"):
        path = FIXTURES / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    tokenizer_size = write_tokenizer(FIXTURES / "tokenizer")
    print(f"tokenizer: {tokenizer_size} tokens")
    tok = AutoTokenizer.from_pretrained(FIXTURES / "tokenizer")
    assert len(tok) == tokenizer_size
    write_chat_template_fixture(FIXTURES / "tokenizer")
    for spec in model_specs(tokenizer_size):
        make_model_fixture(spec, tok)


if __name__ == "__main__":
    main()
