"""The chat request as OpenAI clients send it: unknown OpenAI fields ignored, wrong types refused
(strict JSON: never coerced), message parts joined, `developer` read as `system`, `stop` bounded."""

import json

import pytest
from pydantic import ValidationError

from lessserve.cluster.openai_types import ChatCompletionRequest

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(**over):
    return ChatCompletionRequest.model_validate_json(json.dumps({**BASE, **over}), strict=True)


def test_openai_fields_are_served_at_their_neutral_values_and_unknown_fields_refused():
    r = parse(logit_bias={}, frequency_penalty=0.0, presence_penalty=0, response_format={"type": "text"},
              parallel_tool_calls=False, store=False, service_tier="auto", modalities=["text"], user="u",
              metadata={"a": "b"}, n=2, logprobs=True, top_logprobs=3)
    assert r.model == "m" and r.n == 2 and r.logprobs_k() == 3
    for bad in ({"frequency_penalty": 0.5}, {"logit_bias": {"1": 2}}, {"store": True}, {"best_of": 2},
                {"function_call": "auto"}, {"prediction": {"type": "content", "content": "x"}}):
        with pytest.raises(ValidationError) as e:
            parse(**bad)
        assert next(iter(bad)) in str(e.value)


@pytest.mark.parametrize("field,value", [("temperature", "0.5"), ("max_tokens", 5.5), ("max_tokens", "5"),
                                         ("stream", "yes"), ("top_p", 0), ("n", 17), ("messages", []),
                                         ("stop", ["a", "b", "c", "d", "e"]), ("seed", 2**64)])
def test_wrong_types_and_values_are_refused(field, value):
    with pytest.raises(ValidationError) as e:
        parse(**{field: value})
    assert field in str(e.value)


def test_parts_roles_and_stop():
    r = parse(messages=[{"role": "developer", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
              stop="END")
    assert [m.plain() for m in r.messages] == [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": "ab"}]
    assert r.stop_list() == ["END"]
    for bad in ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}],
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(ValidationError):
            parse(messages=bad)
