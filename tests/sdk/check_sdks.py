"""The official OpenAI and Anthropic SDKs against `protege serve` (run by tests/serve_sdk.rs).

Usage: python check_sdks.py BASE_URL API_KEY ADAPTED_MODEL
The server serves the tiny fixture model as "tiny" and a LoRA adapter trained to answer with a
tool call (written as bare JSON) as ADAPTED_MODEL. Every check raises on failure; the last line
printed is "ok N" with the number of checks passed.
"""

import json
import sys
import urllib.error
import urllib.request

import anthropic
import openai

base, key, adapted = sys.argv[1], sys.argv[2], sys.argv[3]
oa = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)
passed = 0


def check(name, cond, detail=""):
    global passed
    if not cond:
        raise AssertionError(f"{name}: {detail}")
    passed += 1
    print("passed:", name, flush=True)


def raises(name, exc, fn, needle=""):
    try:
        fn()
    except exc as e:
        check(name, needle in str(e), f"{needle!r} not in {e}")
        return e
    raise AssertionError(f"{name}: no {exc.__name__} raised")


hi = [{"role": "user", "content": "Hello there"}]
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "Run a command",
          "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                         "required": ["command"]}}}]

# --- OpenAI: plain, usage, unique ids
r = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=8, extra_body={"temperature": 0})
check("openai plain", r.object == "chat.completion" and r.choices[0].message.role == "assistant")
check("openai usage", r.usage.completion_tokens == 8 or r.choices[0].finish_reason == "stop", r.usage)
r2 = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=2)
check("openai unique ids", r.id != r2.id, (r.id, r2.id))

# --- developer role and content parts
r = oa.chat.completions.create(model="tiny", max_tokens=4, messages=[
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
check("openai developer role", r.choices[0].message is not None)

# --- n and seed
r = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=6, n=3, temperature=1.0, seed=7)
check("openai n=3", sorted(c.index for c in r.choices) == [0, 1, 2], r.choices)
again = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=6, n=3, temperature=1.0, seed=7)
check("openai seed repeats", [c.message.content for c in r.choices] == [c.message.content for c in again.choices])

# --- logprobs
r = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
check("openai logprobs per token", len(lp) == r.usage.completion_tokens, (len(lp), r.usage))
check("openai top_logprobs", all(len(t.top_logprobs) == 3 for t in lp))
check("openai greedy token is the best", all(t.logprob >= t.top_logprobs[0].logprob - 1e-5 for t in lp))
check("openai logprob <= 0", all(t.logprob <= 0 for t in lp))

# --- streaming (+ include_usage) matches the whole reply
whole = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=12, extra_body={"temperature": 0})
chunks = list(oa.chat.completions.create(model="tiny", messages=hi, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("openai stream text", text == whole.choices[0].message.content, (text, whole.choices[0].message.content))
check("openai stream chunks", sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1, len(chunks))
check("openai stream usage", chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens)

# --- stop strings cut the text, also when streamed
if len(whole.choices[0].message.content) > 4:
    stop = whole.choices[0].message.content[2:4]
    cut = oa.chat.completions.create(model="tiny", messages=hi, max_tokens=12, temperature=0, stop=[stop])
    streamed = "".join(c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="tiny", messages=hi, max_tokens=12, temperature=0, stop=[stop], stream=True) if c.choices)
    check("openai stop", stop not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop")
    check("openai stop streamed", streamed == cut.choices[0].message.content, (streamed, cut.choices[0].message.content))

# --- tools: the adapted model answers with a bare JSON call; auto parses it, plain and streamed
r = oa.chat.completions.create(model=adapted, messages=[{"role": "user", "content": "List the files."}],
                               tools=TOOLS, max_tokens=40, extra_body={"temperature": 0})
calls = r.choices[0].message.tool_calls
check("openai tool call parsed", calls and calls[0].function.name == "bash" and r.choices[0].finish_reason == "tool_calls", r)
check("openai tool call args", json.loads(calls[0].function.arguments) == {"command": "ls"}, calls[0].function.arguments)
chunks = list(oa.chat.completions.create(model=adapted, messages=[{"role": "user", "content": "List the files."}],
                                         tools=TOOLS, max_tokens=40, temperature=0, stream=True))
deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
name = "".join(d.function.name or "" for d in deltas if d.function)
args = "".join(d.function.arguments or "" for d in deltas if d.function)
check("openai tool call streamed", name == "bash" and json.loads(args) == {"command": "ls"}, deltas)
check("openai tool stream finish", [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls")
# tool history goes back in
r = oa.chat.completions.create(model=adapted, max_tokens=4, tools=TOOLS, messages=[
    {"role": "user", "content": "List the files."},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "a.py"}])
check("openai tool history", r.choices[0].message is not None)
# tool_choice none: no parsing
r = oa.chat.completions.create(model=adapted, messages=[{"role": "user", "content": "List the files."}],
                               tools=TOOLS, tool_choice="none", max_tokens=40, extra_body={"temperature": 0})
check("openai tool_choice none", not r.choices[0].message.tool_calls and "bash" in r.choices[0].message.content)
# named tool_choice on the base model: the reply starts as that call
r = oa.chat.completions.create(model="tiny", messages=hi, tools=TOOLS, max_tokens=4, temperature=0,
                               tool_choice={"type": "function", "function": {"name": "bash"}})
check("openai named tool_choice forces the call", r.choices[0].message.tool_calls is not None
      or "\"name\": \"bash\"" in (r.choices[0].message.content or ""), r.choices[0].message)

# --- errors in OpenAI's shape, naming the field
e = raises("openai unsupported field", openai.BadRequestError,
           lambda: oa.chat.completions.create(model="tiny", messages=hi, max_tokens=2, extra_body={"guided_json": {}}),
           "guided_json")
check("openai error shape", e.body.get("param") == "guided_json" and e.body.get("type") == "invalid_request_error", e.body)
raises("openai response_format", openai.BadRequestError, lambda: oa.chat.completions.create(
    model="tiny", messages=hi, max_tokens=2, response_format={"type": "json_object"}), "response_format")
raises("openai unknown model", openai.NotFoundError,
       lambda: oa.chat.completions.create(model="gpt-9", messages=hi, max_tokens=2), "gpt-9")
raises("openai too long", openai.BadRequestError,
       lambda: oa.chat.completions.create(model="tiny", messages=hi, max_tokens=100000), "max_tokens")
raises("openai bad key", openai.AuthenticationError, lambda: openai.OpenAI(
    base_url=base + "/v1", api_key="wrong", max_retries=0).chat.completions.create(model="tiny", messages=hi, max_tokens=2))
raises("openai strict tools", openai.BadRequestError, lambda: oa.chat.completions.create(
    model="tiny", messages=hi, max_tokens=2,
    tools=[{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]), "strict")

# --- models
ids = [m.id for m in oa.models.list().data]
check("openai models", ids == ["tiny", adapted], ids)
check("openai model by id", oa.models.retrieve(adapted).id == adapted)
raises("openai missing model", openai.NotFoundError, lambda: oa.models.retrieve("nope"))

# --- Anthropic: plain, streaming, stop_sequences
m = an.messages.create(model="tiny", max_tokens=8, messages=hi, extra_body={"temperature": 0})
check("anthropic plain", m.type == "message" and m.content[0].type == "text" and m.usage.output_tokens > 0)
with an.messages.stream(model="tiny", max_tokens=8, messages=hi, extra_body={"temperature": 0}) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
check("anthropic stream", text == m.content[0].text and final.stop_reason == m.stop_reason, (text, m.content))
raises("anthropic max_tokens required", anthropic.BadRequestError,
       lambda: an.messages.create(model="tiny", messages=hi, max_tokens=0), "max_tokens")
e = raises("anthropic unsupported field", anthropic.BadRequestError,
           lambda: an.messages.create(model="tiny", max_tokens=2, messages=hi, extra_body={"thinking": {}}), "thinking")
check("anthropic error shape", e.body.get("type") == "error" and e.body["error"]["type"] == "invalid_request_error", e.body)
raises("anthropic unknown model", anthropic.NotFoundError, lambda: an.messages.create(
    model="claude-9", max_tokens=2, messages=hi))

# --- Anthropic tools both ways
ATOOLS = [{"name": "bash", "description": "Run a command",
           "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}]
ask = [{"role": "user", "content": "List the files."}]
m = an.messages.create(model=adapted, max_tokens=40, messages=ask, tools=ATOOLS, extra_body={"temperature": 0})
uses = [b for b in m.content if b.type == "tool_use"]
check("anthropic tool_use", m.stop_reason == "tool_use" and uses and uses[0].name == "bash"
      and uses[0].input == {"command": "ls"}, m)
with an.messages.stream(model=adapted, max_tokens=40, messages=ask, tools=ATOOLS, extra_body={"temperature": 0}) as s:
    final = s.get_final_message()
uses = [b for b in final.content if b.type == "tool_use"]
check("anthropic tool_use streamed", uses and uses[0].input == {"command": "ls"}, final)
m = an.messages.create(model=adapted, max_tokens=4, tools=ATOOLS, messages=ask + [
    {"role": "assistant", "content": [{"type": "text", "text": "Listing."},
                                      {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"command": "ls"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.py"}]}])
check("anthropic tool_result history", m.type == "message")

# --- health, metrics
check("health", urllib.request.urlopen(base + "/health").status == 200)
metrics = urllib.request.urlopen(base + "/metrics").read().decode()
check("metrics", "protege_generation_tokens_total" in metrics and "protege_requests_running" in metrics, metrics[:200])
try:
    urllib.request.urlopen(urllib.request.Request(base + "/nope", headers={"Authorization": "Bearer " + key}))
    raise AssertionError("404 expected")
except urllib.error.HTTPError as e:
    body = json.loads(e.read())
    check("404 in JSON", e.code == 404 and "error" in body, body)

print("ok", passed)
