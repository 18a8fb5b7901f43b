"""Real faults against a real Ray Serve cluster, real redis-server processes, the default model:
Redis down (degraded mode), Redis back empty or from its AOF, more conversations than slots
(backpressure), a worker killed before and after its first token. Loopback only; every loop is
bounded in count and time."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
import uuid

import httpx
import pytest

from lessserve.cluster.auth import owner_of
from lessserve.cluster.protocol import scoped_session
from lessserve.testing.local_redis import LocalRedis
from tests.cluster.conftest import KEY_A, deploy

MODEL = "smollm2-135m-instruct"
H = {"Authorization": f"Bearer {KEY_A}"}


def sid() -> str:
    return f"f-{uuid.uuid4().hex[:10]}"


def post(url: str, s: str | None, messages: list[dict], max_tokens: int = 6, **extra) -> httpx.Response:
    hdr = {**H, **({"X-Session-Id": s} if s else {})}
    return httpx.post(url + "/v1/chat/completions", headers=hdr, timeout=300,
                      json={"model": MODEL, "messages": messages, "max_tokens": max_tokens, **extra})


class Conversation:
    """A client that keeps its history and honours 503 + Retry-After (bounded: `tries`)."""

    QUESTIONS = ["Name a colour.", "Name a fruit of that colour.", "Is it sweet?", "Thanks!"]

    def __init__(self, url: str, tries: int = 30):
        self.url, self.sid, self.msgs, self.tries = url, sid(), [], tries
        self.statuses: list[int] = []

    def turn(self, i: int) -> dict:
        self.msgs.append({"role": "user", "content": self.QUESTIONS[i % len(self.QUESTIONS)]})
        for _ in range(self.tries):
            r = post(self.url, self.sid, self.msgs)
            self.statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("retry-after"), r.text
                time.sleep(float(r.headers["retry-after"]))
                continue
            assert r.status_code == 200, r.text
            body = r.json()
            self.msgs.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
            return body
        pytest.fail(f"{self.sid}: no answer after {self.tries} tries: {self.statuses}")

    def turns_recorded(self) -> int:
        return httpx.get(f"{self.url}/v1/sessions/{self.sid}", headers=H, timeout=60).json()["turns"]


@pytest.fixture(scope="module")
def variant_redis(serve_cluster):
    """The Redis servers this module's variants use. They outlive the variants: the cluster's own
    config comes back (its replicas drain with their Redis still up) before they stop."""
    made: list[LocalRedis] = []
    yield made
    deploy(serve_cluster["cfg"])
    for r in made:
        r.stop()


@pytest.fixture
def faulty(serve_cluster, variant_redis):
    """Deploy a variant of the cluster's config. It is left running: the next variant replaces it with
    one deploy, and the next test that needs the cluster's own config redeploys that."""

    def make(redis_persist: bool | None = True, redis_password_file: str | None = None, **over) -> dict:
        cfg = json.loads(json.dumps(serve_cluster["cfg"]))
        redis = None
        if redis_persist is None:
            cfg["store"]["redis_url"] = None
        else:
            password = open(redis_password_file).read().strip() if redis_password_file else None
            redis = LocalRedis(persist=redis_persist, password=password).start()
            variant_redis.append(redis)
            cfg["store"]["redis_url"] = redis.url
            if redis_password_file:
                cfg["store"]["redis_password_file"] = redis_password_file
        for dotted, v in over.items():
            *path, last = dotted.split("__")
            d = cfg
            for p in path:
                d = d.setdefault(p, {})
            d[last] = v
        deploy(cfg)
        return {"url": serve_cluster["url"], "redis": redis, "cfg": cfg}

    return make


def report(fault: str, convs: list[Conversation]) -> None:
    """One row of the fault table in docs/reliability.md (`pytest tests/cluster/test_faults.py -s`)."""
    st = [x for cv in convs for x in cv.statuses]
    print(f"\nFAULT-TABLE | {fault} | {len(st)} | {sum(x >= 500 and x != 503 for x in st)} | {st.count(503)} | "
          f"{len(convs)} of {len(convs)} |")


def wait_for(cond, timeout: float = 30, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(cond)


def test_redis_down_then_back_empty_every_conversation_continues(faulty):
    c = faulty(redis_persist=False)
    url, redis = c["url"], c["redis"]
    convs = [Conversation(url) for _ in range(4)]
    for cv in convs:
        cv.turn(0)
    redis.kill()
    health = wait_for(lambda: (h := httpx.get(url + "/healthz", timeout=30)).json()["status"] == "degraded" and h)
    assert health.status_code == 200 and "redis" in health.json()["reasons"][0]
    ready = httpx.get(url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    for cv in convs:  # resident sessions keep serving from their workers, only new tokens prefilled
        body = cv.turn(1)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    fresh = Conversation(url)
    fresh.turn(0)  # a new session is served locally
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "Once upon a", "max_tokens": 2, "echo": True, "logprobs": 1})):
        r = httpx.post(url + path, headers=H, json={"model": MODEL, **body}, timeout=120)  # one-offs: no Redis needed
        assert r.status_code == 200, r.text
    redis.start()  # back, empty: the workers re-publish directory entries and transcripts
    wait_for(lambda: httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok")
    probe, owner = redis.client(), owner_of(H["Authorization"], {KEY_A})
    held = [scoped_session(owner, cv.sid) for cv in [*convs, fresh]]  # the ids under the key, as workers hold them
    wait_for(lambda: all(probe.exists(f"lessserve:directory:{s}") and probe.exists(f"lessserve:kv:{s}:ts")
                         for s in held), timeout=30)
    for cv in [*convs, fresh]:
        cv.turn(2 if cv is not fresh else 1)
    for cv in convs:
        assert cv.turns_recorded() == 3 and len(cv.msgs) == 6
        assert all(s == 200 for s in cv.statuses), cv.statuses
    assert fresh.turns_recorded() == 2
    report("Redis killed with 4 conversations resident, a new one started, Redis back empty", [*convs, fresh])


def test_a_redis_with_requirepass_serves_end_to_end_from_a_password_file(faulty, tmp_path):
    """The chart's wiring, through the real cluster: Redis AUTH from a mounted file (a Secret);
    sessions are placed, transcripts and caches reach Redis, health is ok, not degraded."""
    secret = tmp_path / "redis-password"
    secret.write_text("s3cr:t@pw-" + uuid.uuid4().hex + "\n")
    c = faulty(redis_persist=False, redis_password_file=str(secret), store__device_idle_s=1.0,
               store__host_idle_s=1.0)
    url, redis = c["url"], c["redis"]
    convs = [Conversation(url) for _ in range(2)]
    for i in range(2):
        for cv in convs:
            cv.turn(i)
    assert httpx.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    info = lambda cv: httpx.get(f"{url}/v1/sessions/{cv.sid}", headers=H, timeout=60).json()  # noqa: E731
    wait_for(lambda: all(info(cv)["tier"] == "redis" for cv in convs), timeout=60)  # caches offloaded there
    probe, owner = redis.client(), owner_of(H["Authorization"], {KEY_A})
    for held in (scoped_session(owner, cv.sid) for cv in convs):  # read back with the password
        assert probe.exists(f"lessserve:directory:{held}", f"lessserve:kv:{held}:ts", f"lessserve:kv:{held}:ptr") == 3
    for cv in convs:
        body = cv.turn(2)  # restored from the password-protected Redis: only the new message prefilled
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 20, body["usage"]
        assert cv.turns_recorded() == 3 and all(st == 200 for st in cv.statuses), cv.statuses


def test_offloaded_caches_restore_from_redis_aof_after_a_crash(faulty):
    c = faulty(redis_persist=True, store__device_idle_s=1.0, store__host_idle_s=1.0)
    url, redis = c["url"], c["redis"]
    convs = [Conversation(url) for _ in range(2)]
    for cv in convs:
        cv.turn(0)
    info = lambda cv: httpx.get(f"{url}/v1/sessions/{cv.sid}", headers=H, timeout=60).json()  # noqa: E731
    wait_for(lambda: all(info(cv)["tier"] == "redis" for cv in convs), timeout=60)
    redis.restart()  # SIGKILL, then the same port and folder: the AOF replays every acknowledged write
    for cv in convs:
        before = len(cv.msgs)
        body = cv.turn(1)
        # restored from Redis: the history was not prefilled again, only the new message
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 20, body["usage"]
        assert info(cv)["turns"] == 2 and len(cv.msgs) == before + 2
    report("caches offloaded to Redis, Redis SIGKILLed and back from its AOF", convs)


def test_without_redis_the_state_actor_holds_caches_transcripts_and_records(faulty):
    """No Redis: the shared state is the cluster-state actor's key-value map (ActorKV). Caches go
    there when idle and come back without a re-prefill; Responses records chain through it."""
    c = faulty(redis_persist=None, store__device_idle_s=1.0, store__host_idle_s=1.0)
    url = c["url"]
    convs = [Conversation(url) for _ in range(2)]
    for cv in convs:
        cv.turn(0)
    info = lambda cv: httpx.get(f"{url}/v1/sessions/{cv.sid}", headers=H, timeout=60).json()  # noqa: E731
    wait_for(lambda: all(info(cv)["tier"] == "cluster" for cv in convs), timeout=60)
    for cv in convs:
        body = cv.turn(1)
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 20, body["usage"]
        assert info(cv)["turns"] == 2
    r1 = httpx.post(url + "/v1/responses", headers=H, timeout=300,
                    json={"model": MODEL, "input": "Name a colour.", "max_output_tokens": 4})
    assert r1.status_code == 200, r1.text
    r2 = httpx.post(url + "/v1/responses", headers=H, timeout=300,
                    json={"model": MODEL, "input": "Why?", "max_output_tokens": 4,
                          "previous_response_id": r1.json()["id"]})
    assert r2.status_code == 200, r2.text
    got = httpx.get(f"{url}/v1/responses/{r2.json()['id']}", headers=H, timeout=60)
    assert got.status_code == 200 and got.json()["previous_response_id"] == r1.json()["id"]
    ready = httpx.get(url + "/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.json()
    report("no Redis: caches offloaded to the cluster-state actor and restored, a Responses chain", convs)


def test_more_conversations_than_slots_all_complete_without_500(faulty):
    """The reported failure: max_slots 2, no host tier, 8 concurrent conversations -> 6 of 14
    requests were 500 RayTaskError(TierFullError). Now: wait for a slot, or 503 + Retry-After."""
    c = faulty(redis_persist=True, engine__max_slots=2, store__host_bytes=0, queue_depth=2, queue_max_wait_s=5.0,
               workers={"min_workers": 1, "max_workers": 1})
    convs = [Conversation(c["url"], tries=60) for _ in range(8)]

    def run(cv: Conversation) -> None:
        for i in range(2):
            cv.turn(i)

    with cf.ThreadPoolExecutor(8) as pool:
        list(pool.map(run, convs, timeout=900))
    statuses = [s for cv in convs for s in cv.statuses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) == 16
    for cv in convs:
        assert cv.turns_recorded() == 2
    report("max_slots 2, host_bytes 0, 8 concurrent conversations x 2 turns", convs)
    metrics = httpx.get(c["url"] + "/metrics", timeout=30).text
    assert "lessserve_turn_waits_total" in metrics and "lessserve_turns_waiting" in metrics


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _kill_worker_of(url: str, s: str, after_s: float) -> threading.Thread:
    import ray

    victim = httpx.get(f"{url}/v1/sessions/{s}", headers=H, timeout=60).json()["worker"]

    def kill():
        time.sleep(after_s)
        for a in ray.util.list_named_actors(all_namespaces=True):
            if victim in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)

    t = threading.Thread(target=kill, daemon=True)
    t.start()
    return t


LONG = " ".join(f"Item {i}: a stone bridge over a slow river, painted in the morning light." for i in range(90))


def test_worker_killed_before_the_first_token_is_retried_elsewhere(faulty):
    c = faulty(redis_persist=True, workers={"min_workers": 2, "max_workers": 2})
    cv = Conversation(c["url"])
    cv.turn(0)
    retries = _metric(c["url"], "lessserve_turn_retries_total")
    killer = _kill_worker_of(c["url"], cv.sid, after_s=1.0)  # during the long prefill below
    cv.msgs.append({"role": "user", "content": "Summarise this list: " + LONG})
    r = post(c["url"], cv.sid, cv.msgs, max_tokens=4)
    killer.join(30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip()
    st = httpx.get(f"{c['url']}/v1/sessions/{cv.sid}", headers=H, timeout=60).json()
    assert st["turns"] == 2  # the retried turn appended its user message once
    assert _metric(c["url"], "lessserve_turn_retries_total") == retries + 1  # it was retried, not just slow
    cv.statuses.append(r.status_code)
    report("worker SIGKILLed before the first token (router retries elsewhere)", [cv])


def test_worker_killed_mid_stream_ends_the_stream_with_an_error_event(faulty):
    c = faulty(redis_persist=True, workers={"min_workers": 2, "max_workers": 2})
    cv = Conversation(c["url"])
    cv.turn(0)
    cv.msgs.append({"role": "user", "content": "Write a long story about a lighthouse keeper."})
    hdr = {**H, "X-Session-Id": cv.sid}
    body = {"model": MODEL, "messages": cv.msgs, "max_tokens": 400, "stream": True}
    events, killer = [], None
    with httpx.stream("POST", c["url"] + "/v1/chat/completions", json=body, headers=hdr, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if killer is None and '"content": "' in line and '"content": ""' not in line:
                killer = _kill_worker_of(c["url"], cv.sid, after_s=0.0)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])
    assert "error" in err and err["error"]["message"], events[-3:]
    cv.msgs.pop()
    cv.turn(1)  # the conversation goes on, on the surviving worker
