"""The openai SDK listing and retrieving models, adapters among them, and chatting with one.

Run by tests/tests/lora.rs with the pinned SDK (requirements-openai.txt):

    python openai_models.py BASE_URL ADAPTER MISSING

Prints one JSON line: the listed models with their parents, the retrieved adapter's id and
parent, the error class retrieving MISSING raised (and the request id it carries), the model a
chat with ADAPTER answered as, and the request id the SDK read from that answer.
"""

import json
import sys

import openai

base_url, adapter, missing = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
listed = {model.id: (model.model_extra or {}).get("parent") for model in client.models.list()}
card = client.models.retrieve(adapter)
try:
    client.models.retrieve(missing)
    missing_error = missing_request_id = None
except openai.APIStatusError as err:
    missing_error = type(err).__name__
    missing_request_id = err.request_id
answer = client.chat.completions.create(
    model=adapter, messages=[{"role": "user", "content": "hi"}], max_tokens=4
)
print(
    json.dumps(
        {
            "listed": listed,
            "retrieved": [card.id, (card.model_extra or {}).get("parent")],
            "missing": missing_error,
            "answered_as": answer.model,
            "request_ids": [missing_request_id, answer._request_id],
        }
    )
)
