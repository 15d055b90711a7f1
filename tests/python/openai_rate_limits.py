"""What the official openai SDK sees from a gateway whose model is capped.

Run by tests/tests/penalties.rs with the pinned SDK (requirements-openai.txt):

    python openai_rate_limits.py BASE_URL CAPPED_MODEL FREE_MODEL SECONDS

Eight workers, each with its own client and the SDK's default retries, call the capped model
for SECONDS while a ninth calls an uncapped model from the same address. Prints one JSON
summary line:
- "outcomes": how the workers' calls ended, by exception class ("ok" for success);
- "free": how the uncapped model's calls ended, likewise;
- "retry_gaps": seconds between a 429 and the SDK's retry of the same call;
- "retry_after": the Retry-After values the 429s carried.
"""

import json
import sys
import threading
import time
from collections import Counter

import openai

base_url, capped, free, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
deadline = time.monotonic() + seconds
lock = threading.Lock()
outcomes, free_outcomes = Counter(), Counter()
retry_gaps, retry_after = [], []


def client(events):
    """A client whose every attempt and answer is noted in `events`."""

    def on_request(request):
        events.append(("request", time.monotonic()))

    def on_response(response):
        events.append(("response", time.monotonic(), response.status_code, response.headers.get("retry-after")))

    http = openai.DefaultHttpxClient(event_hooks={"request": [on_request], "response": [on_response]})
    return openai.OpenAI(base_url=base_url, api_key="unused", http_client=http)


def call(sdk, model):
    sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4)


def worker(model, tally):
    events = []
    sdk = client(events)
    while time.monotonic() < deadline:
        events.append(("call",))
        try:
            call(sdk, model)
            outcome = "ok"
        except Exception as err:  # every failure is tallied by its class
            outcome = type(err).__name__
        with lock:
            tally[outcome] += 1
    # Within one call, an attempt that follows a 429 is the SDK's retry.
    last_429 = None
    for event in events:
        if event[0] == "call":
            last_429 = None
        elif event[0] == "response" and event[2] == 429:
            last_429 = event[1]
            with lock:
                retry_after.append(event[3])
        elif event[0] == "request" and last_429 is not None:
            with lock:
                retry_gaps.append(round(event[1] - last_429, 3))
            last_429 = None


threads = [threading.Thread(target=worker, args=(capped, outcomes)) for _ in range(8)]
threads.append(threading.Thread(target=worker, args=(free, free_outcomes)))
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"outcomes": outcomes, "free": free_outcomes, "retry_gaps": retry_gaps, "retry_after": retry_after}))
