"""Chat-template fixtures for models whose template is not Qwen2.5's (tests/it/chat_template.rs).

Run as `python3 tools/make_chat_template_fixtures.py` (re-executes itself in the pinned
reference venv, see refenv.py; offline). It writes, from tests/fixtures/tokenizer/:

chat_other/   the test tokenizer with a made-up template in tokenizer_config.json as a list
              of named templates ("default" and "tool_use"), other markers ([USER], ...),
              `<|endoftext|>` as bos_token, `.strip()`, `trim`, `upper`, `tojson(indent=2)`
              and `tojson(separators=...)`, `raise_exception`, a slice of messages.
chat_qwen3/   the test tokenizer with a Qwen3-style template in chat_template.jinja (which
              wins over the Qwen2.5 template still in its tokenizer_config.json): reasoning
              split off `</think>`, an empty thinking block in the last assistant turn only.
chat_templates.json  {"<dir>": [{"name", "messages", "tools", "add_generation_prompt",
              "text", "input_ids"}]}: transformers' apply_chat_template for each case.
"""

from refenv import ensure_venv

ensure_venv()

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

OTHER_HEAD = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'].strip() %}
    {%- set rest = messages[1:] %}
{%- else %}
    {%- set system = 'Be brief.' %}
    {%- set rest = messages %}
{%- endif %}
{{- '<|im_start|>[SYSTEM]\\n' + system }}
"""

OTHER_TOOLS = """{%- if tools %}
    {{- '\\nTools:\\n' }}
    {%- for tool in tools %}
        {{- (tool.function if tool.function is defined else tool) | tojson(indent=2) + '\\n' }}
    {%- endfor %}
{%- endif %}
"""

OTHER_BODY = """{{- eos_token + '\\n' }}
{%- for message in rest %}
    {%- if message.role not in ['user', 'assistant', 'tool', 'system'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {{- '<|im_start|>[' + message.role | upper + ']\\n' }}
    {%- if message.content is defined and message.content %}
        {{- message.content | trim }}
    {%- endif %}
    {%- for call in message.tool_calls | default([]) %}
        {{- '\\n<tool_call>' + {'name': call.function.name, 'args': call.function.arguments} | tojson(separators=(',', ':')) + '</tool_call>' }}
    {%- endfor %}
    {{- eos_token + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>[ASSISTANT]\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "bash",
            "description": "Run a command → get its output.",
            "parameters": {
                "type": "object",
                "properties": {"command": {"type": "string", "description": "e.g. \"ls\""}},
                "required": ["command"],
            },
        },
    }
]


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CASES = [
    ("single_user", [{"role": "user", "content": "Hello! What is the capital of France?"}], None, True),
    (
        "multi_turn",
        [
            {"role": "system", "content": "  You are terse.\n"},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And times 3?"},
        ],
        None,
        True,
    ),
    (
        "tools_round",
        [
            {"role": "system", "content": "You fix bugs."},
            {"role": "user", "content": "List the files, café."},
            {"role": "assistant", "content": "Listing.", "tool_calls": [call("bash", {"command": "ls -la", "n": 2})]},
            {"role": "tool", "name": "bash", "content": "a.py\nb.py"},
            {"role": "assistant", "content": None, "tool_calls": [call("bash", {"command": "cat a.py"})]},
            {"role": "tool", "name": "bash", "content": "print(1)"},
            {"role": "tool", "name": "bash", "content": "(no output)"},
            {"role": "assistant", "content": "Two files; a.py prints 1."},
        ],
        TOOLS,
        False,
    ),
    (
        "ends_with_assistant",
        [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "  Paris.  \n"},
        ],
        None,
        False,
    ),
    (
        "reasoning_in_history",
        [
            {"role": "user", "content": "2 + 2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4."},
            {"role": "user", "content": "Times 3?"},
            {"role": "assistant", "content": "12."},
        ],
        None,
        False,
    ),
]


def tokenizer_config(template):
    config = json.loads((FIXTURES / "tokenizer" / "tokenizer_config.json").read_text())
    if template is not None:
        config["chat_template"] = template
    return config


def write_dir(name, config, jinja=None):
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    return out


def render_cases(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    cases = []
    for name, messages, tools, add_generation_prompt in CASES:
        kwargs = {"tools": tools, "add_generation_prompt": add_generation_prompt}
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text, name
        print(f"{path.name} {name}: {len(text)} chars, {len(ids)} ids")
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
    return cases


def main():
    other = tokenizer_config(
        [
            {"name": "default", "template": OTHER_HEAD + OTHER_BODY},
            {"name": "tool_use", "template": OTHER_HEAD + OTHER_TOOLS + OTHER_BODY},
        ]
    )
    other["bos_token"] = "<|endoftext|>"
    dirs = {
        "chat_other": write_dir("chat_other", other),
        # The Qwen2.5 template stays in tokenizer_config.json: chat_template.jinja wins.
        "chat_qwen3": write_dir("chat_qwen3", tokenizer_config(None), jinja=QWEN3),
    }
    fixture = {name: render_cases(path) for name, path in dirs.items()}
    (FIXTURES / "chat_templates.json").write_text(json.dumps(fixture, ensure_ascii=False, indent=2) + "\n")


if __name__ == "__main__":
    main()
