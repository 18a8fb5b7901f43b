"""The worker pods' preStop hook: drain the node, wait for worker replicas to leave, stop Ray."""

from __future__ import annotations

from lessserve.deploy import prestop


def _proc(tmp_path, titles: dict[int, bytes]):
    for pid, title in titles.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(title)
    (tmp_path / "self").mkdir()
    return tmp_path


def test_replica_pids_matches_worker_replicas_only(tmp_path):
    proc = _proc(tmp_path, {
        11: b"ray::ServeReplica:lessserve:LessWorker\0",
        12: b"ray::ServeReplica:lessserve:LessWorker.handle_request_streaming\0",
        13: b"ray::ServeReplica:lessserve:Router\0",
        14: b"/home/ray/anaconda3/bin/python\0-m\0ray.util.client.server\0",
        15: b"",
    })
    assert prestop.replica_pids(proc) == [11, 12]


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_waits_for_replicas_then_stops_ray():
    clock, calls = _Clock(), []
    left = iter([[7, 8], [7, 8], [8], []])
    out = prestop.run(70, 1.0, drain=lambda d: calls.append(("drain", d)) or 0, replicas=lambda: next(left),
                      stop=lambda: calls.append("stop") or 0, clock=clock, sleep=clock.sleep)
    assert calls == [("drain", 70), "stop"]
    assert out["replicas_left"] == [] and out["waited_s"] == 3.0


def test_gives_up_at_the_timeout():
    clock, calls = _Clock(), []
    out = prestop.run(5, 1.0, drain=lambda d: 0, replicas=lambda: [9], stop=lambda: calls.append("stop") or 0,
                      clock=clock, sleep=clock.sleep)
    assert out["replicas_left"] == [9] and out["waited_s"] == 5.0 and calls == ["stop"]


def test_idle_node_skips_the_drain():
    calls = []
    out = prestop.run(60, drain=lambda d: calls.append("drain") or 0, replicas=lambda: [], stop=lambda: 0)
    assert calls == [] and out["drain_rc"] is None


def test_failing_commands_do_not_raise():
    assert prestop._run(["/nonexistent/ray", "stop"], timeout=5) == -1


def test_head_waits_for_replicas_cluster_wide():
    actors = [{"actor_id": "a1", "class_name": "ServeReplica:lessserve:LessWorker", "state": "ALIVE"},
              {"actor_id": "a2", "class_name": "ServeReplica:lessserve:Router", "state": "ALIVE"},
              {"actor_id": "a3", "class_name": "ServeController", "state": "ALIVE"}]
    seen = {}

    def fake_list(**kw):
        seen.update(kw)
        return actors

    assert prestop.cluster_replicas(list_actors=fake_list) == ["a1"]
    assert seen["address"] == "http://127.0.0.1:8265" and ("state", "=", "ALIVE") in seen["filters"]
    assert prestop.cluster_replicas(list_actors=lambda **kw: (_ for _ in ()).throw(ConnectionError())) == []
    clock = _Clock()
    left = iter([["a1"], ["a1"], []])
    out = prestop.run(100, 2.0, drain=None, replicas=lambda: next(left), stop=None, clock=clock, sleep=clock.sleep)
    assert out == {"drain_rc": None, "replicas_left": [], "waited_s": 4.0, "stop_rc": None}
