"""Clients written elsewhere, against the real cluster (Ray Serve, Redis, the default model) on
127.0.0.1: the `openai` client's n, logprobs, structured outputs and completions; LangChain's
ChatOpenAI; LiteLLM's OpenAI-compatible provider; lm-evaluation-harness's `local-completions`
over tasks defined on ../shared/data. No data set or model is fetched."""

from __future__ import annotations

import json

from tests.cluster.conftest import KEY_A

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_openai_n_2_gives_two_different_choices_with_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                       n=2, temperature=1.0, seed=3, max_tokens=12, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    for c in r.choices:
        lp = c.logprobs.content
        assert lp and all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in lp)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)  # the prompt counted once


def test_openai_json_schema_output_validates_for_every_seed(client):
    for seed in range(0, 8, 2):  # choice i samples with seed + i: 8 distinct seeds
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe a person."}], temperature=1.0, seed=seed,
            max_tokens=60, n=2,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                    "strict": True}})
        for c in r.choices:
            obj = json.loads(c.message.content)
            assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and c.finish_reason == "stop"


def test_openai_forced_tool_call_and_its_result_continue_the_session(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string",
                                                                                      "maxLength": 20}},
                                                              "required": ["city"], "additionalProperties": False},
                                               "strict": True}}]
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    hdr = {"X-Session-Id": "tool-call-1"}
    r = client.chat.completions.create(model=MODEL, messages=msgs, tools=tools, tool_choice="required",
                                       max_tokens=40, extra_headers=hdr)
    assert r.choices[0].message.tool_calls, r.choices[0]
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    r2 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, extra_headers=hdr)
    assert r2.choices[0].message.content and r2.usage.prompt_tokens_details.cached_tokens > 0  # the cache went on


def test_openai_completions_echo_logprobs_match_the_chat_path(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=1, echo=True,
                                  logprobs=1, temperature=0)
    c = r.choices[0]
    assert c.text.startswith("The capital of France is")
    lp = c.logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == len(lp.top_logprobs)
    only = client.completions.create(model=MODEL, prompt=[[504, 3575, 282], [504]], max_tokens=0, echo=True,
                                     logprobs=0)
    assert [len(x.logprobs.tokens) for x in only.choices] == [3, 1]


def test_langchain_chat_session_and_structured_output(cluster):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    llm = ChatOpenAI(model=MODEL, base_url=cluster["url"] + "/v1", api_key=KEY_A, max_tokens=48, temperature=0,
                     default_headers={"X-Session-Id": "langchain-1"}, max_retries=0, timeout=300)
    first = llm.invoke([("user", "My name is Ada.")])
    second = llm.invoke([("user", "My name is Ada."), ("assistant", first.content), ("user", "Say hello.")])
    assert second.content and second.usage_metadata["input_token_details"].get("cache_read", 0) > 0

    class Person(BaseModel):
        name: str = Field(max_length=16)
        age: int = Field(ge=0, le=120)

    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Person, method=method, include_raw=True).invoke("Describe a person.")
        assert isinstance(out["parsed"], Person), out


def test_litellm_openai_provider_chat_stream_and_json(cluster, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch the cost map
    import litellm

    kw = dict(model=f"openai/{MODEL}", api_base=cluster["url"] + "/v1", api_key=KEY_A, max_tokens=16,
              temperature=0)
    msgs = [{"role": "user", "content": "Say hi."}]
    r = litellm.completion(messages=msgs, **kw)
    text = r.choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in litellm.completion(messages=msgs, stream=True, **kw))
    assert text and streamed == text
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    r = litellm.completion(messages=[{"role": "user", "content": "A city as JSON."}], response_format=City,
                           **{**kw, "max_tokens": 60})
    City.model_validate_json(r.choices[0].message.content)


def test_lm_eval_harness_scores_through_the_server(cluster, monkeypatch):
    """lm-evaluation-harness's own `local-completions` model (evals/harness.py), on tasks over the
    test part of a shared text: rolling loglikelihood, a two-way choice and generation all run."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY_A)  # the harness's bearer token
    import tempfile
    from pathlib import Path

    from lessserve.evals.harness import evaluate, score_row
    from lessserve.evals.harness_tasks import part_docs, write_tasks
    from lessserve.workers.config import EngineConfig
    from lessserve.workers.model_loader import load_checkpoint

    folder = load_checkpoint(EngineConfig().model).folder
    docs = part_docs("brown", "test", 4, chars=400)
    with tempfile.TemporaryDirectory() as tmp:
        out = evaluate(cluster["url"], MODEL, folder, write_tasks(Path(tmp), docs), limit=3)
    row = score_row("h2o", 48, out, [20] * 4)
    assert row["docs"] == 3 and all(ll < 0 for ll in row["rolling_ll"])
    assert 0 < row["bits_per_byte"] < 10 and 0 <= row["choice_acc"] <= 1 and 0 <= row["gen_exact_match"] <= 1


def test_openai_agents_sdk_function_tool_then_a_follow_up_on_the_responses_api(cluster):
    """The OpenAI Agents SDK on /v1/responses: an agent whose one function tool is forced
    (tool_choice required; the SDK runs the tool and stops on its result), then a second agent
    continuing that conversation with previous_response_id. (tool_choice 'auto', which the SDK
    sends once a tool has run, is refused by this server: docs/serving.md.)"""
    import asyncio

    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI
    from pydantic import BaseModel, Field

    class Farewell(BaseModel):
        message: str = Field(max_length=40)

    set_tracing_disabled(True)
    model = OpenAIResponsesModel(model=MODEL, openai_client=AsyncOpenAI(base_url=cluster["url"] + "/v1",
                                                                       api_key=KEY_A, max_retries=0, timeout=300))
    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"Sunny in {city}"

    agent = Agent(name="weather", instructions="Use the tool.", model=model, tools=[get_weather],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=120),
                  tool_use_behavior="stop_on_first_tool")

    async def main():
        first = await Runner.run(agent, "What is the weather in Paris?")
        # a structured final output (text.format json_schema, enforced): the 135M model ends its answer
        chat = Agent(name="chat", instructions="Be brief.", model=model, output_type=Farewell,
                     model_settings=ModelSettings(max_tokens=80))
        second = await Runner.run(chat, "Thank you. Say goodbye.", previous_response_id=first.last_response_id)
        streamed = Runner.run_streamed(agent, "And in Rome?", previous_response_id=second.last_response_id)
        async for _ in streamed.stream_events():  # the forced call, streamed whole when it completes
            pass
        return first, second, streamed

    first, second, streamed = asyncio.run(main())
    assert len(cities) == 2 and first.final_output == f"Sunny in {cities[0]}"
    assert isinstance(second.final_output, Farewell) and second.last_response_id != first.last_response_id
    assert streamed.final_output == f"Sunny in {cities[1]}"
