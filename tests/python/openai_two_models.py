"""One openai SDK client calling two models in turn, as a program using several models does.

Run by tests/tests/kernel.rs with the pinned SDK (requirements-openai.txt):

    python openai_two_models.py BASE_URL MODEL_A MODEL_B CALLS

The SDK keeps one pooled keep-alive connection, so every call after the first reuses it for
whichever model comes next. The prompts differ in length so the models' byte counts differ.
Prints one JSON line: the calls that succeeded, per model.
"""

import json
import sys

import openai

base_url, model_a, model_b, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
done = {model_a: 0, model_b: 0}
for i in range(calls):
    model, prompt = (model_a, "short") if i % 2 == 0 else (model_b, "a much longer prompt " * 60)
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8)
    done[model] += 1
print(json.dumps(done))
