"""Bad Responses API bodies and the field each 400 must name: one table for the fake router's tests
and the real cluster's."""

BAD_RESPONSES = [
    ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "assistant", "content": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"input": "x", "previous_response_id": "nope"}, "previous_response_id"),
]
