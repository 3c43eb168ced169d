#!/usr/bin/env python3
# SPDX-License-Identifier: EUPL-1.2
"""The official `openai` package against our server (started by
tests/openai_client.rs): every call must succeed and give what the server's
models script or compute. Exits non-zero on the first failure.

Models served: `qwen3` (the MLX Qwen3 fixture), `tools` (a scripted model
writing a Hermes tool call after reasoning), `words` (a scripted model
answering "Hello there!").
"""

import sys

import openai
from openai import OpenAI

base, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


ids = [m.id for m in client.models.list().data]
check(ids == ["qwen3", "tools", "words"], f"models listed: {ids}")

r = client.chat.completions.create(
    model="words", messages=[{"role": "user", "content": "hi"}], temperature=0)
check(r.choices[0].message.content == "Hello there!", "chat, whole")
check(r.choices[0].finish_reason == "stop", "finish reason stop")
check(r.usage.completion_tokens == 3 and r.usage.prompt_tokens == 2, "usage")

parts, usage = [], None
for chunk in client.chat.completions.create(
        model="words", messages=[{"role": "user", "content": "hi"}], temperature=0,
        stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
check("".join(parts) == "Hello there!", "chat, streamed")
check(usage is not None and usage.completion_tokens == 3, "streamed usage")

r = client.chat.completions.create(
    model="words", messages=[{"role": "user", "content": "hi"}], temperature=0, stop=["there"])
check(r.choices[0].message.content == "Hello ", f"stop: {r.choices[0].message.content!r}")

tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
r = client.chat.completions.create(
    model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}],
    tools=tools, temperature=0)
m = r.choices[0].message
check(r.choices[0].finish_reason == "tool_calls", "tool call finish reason")
check(m.tool_calls[0].function.name == "get_weather", "tool call name")
check(m.tool_calls[0].function.arguments == '{"city":"Paris"}', "tool call arguments")
check(getattr(m, "reasoning_content", None) == "Need the weather.", "reasoning_content")

names = []
for chunk in client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools, temperature=0, stream=True):
    for c in chunk.choices:
        for tc in c.delta.tool_calls or []:
            names.append(tc.function.name)
check(names == ["get_weather"], "streamed tool call")

# The conversation goes on with the tool's answer.
r = client.chat.completions.create(model="words", temperature=0, messages=[
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
])
check(r.choices[0].message.content == "Hello there!", "tool results are accepted")

# The MLX fixture: greedy is deterministic, logprobs come back, a seed
# repeats a sampled answer.
msgs = [{"role": "user", "content": "Tell me about the sea"}]
a = client.chat.completions.create(model="qwen3", messages=msgs, temperature=0, max_tokens=10,
                                   logprobs=True, top_logprobs=3)
b = client.chat.completions.create(model="qwen3", messages=msgs, temperature=0, max_tokens=10)
check(a.choices[0].message.content == b.choices[0].message.content, "greedy repeats")
lp = a.choices[0].logprobs.content
check(len(lp) == a.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in lp),
      "logprobs and top_logprobs")
check(all(t.logprob <= 0 for t in lp), "log-probabilities are at most 0")
s1 = client.chat.completions.create(model="qwen3", messages=msgs, temperature=0.9, seed=7, max_tokens=10)
s2 = client.chat.completions.create(model="qwen3", messages=msgs, temperature=0.9, seed=7, max_tokens=10)
check(s1.choices[0].message.content == s2.choices[0].message.content, "a seed repeats")
check(a.usage.prompt_tokens_details.cached_tokens >= 0, "cached tokens reported")

c = client.completions.create(model="qwen3", prompt="Once upon a time", max_tokens=5,
                              temperature=0, logprobs=2, echo=True)
check(c.choices[0].text.startswith("Once upon a time"), "completion with echo")
check(len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens, "completion logprobs")
text = "".join(x.choices[0].text for x in client.completions.create(
    model="qwen3", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True))
check(c.choices[0].text == "Once upon a time" + text, "streamed completion")

for call, exc, what in [
    (lambda: client.chat.completions.create(model="words", messages=[], temperature=0),
     openai.BadRequestError, "no messages"),
    (lambda: client.chat.completions.create(model="words", temperature=0,
                                            messages=[{"role": "user", "content": "hi"}],
                                            extra_body={"frobnicate": 1}),
     openai.BadRequestError, "an unknown field"),
    (lambda: client.chat.completions.create(model="words", n=2,
                                            messages=[{"role": "user", "content": "hi"}]),
     openai.BadRequestError, "n = 2"),
    (lambda: client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}]),
     openai.NotFoundError, "an unknown model"),
    (lambda: OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list(),
     openai.AuthenticationError, "a wrong key"),
]:
    try:
        call()
    except exc as e:
        check(True, f"{what}: {type(e).__name__} ({e.status_code})")
    else:
        raise AssertionError(f"{what}: no error")
print("all passed")
