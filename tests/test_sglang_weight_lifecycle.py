"""The distributed weight sync's session and group lifecycle, against receiving servers.

Each server is ``python -m tests.dist.sglang_receiver`` (the mock, playing the SGLang release
given by ``--version``, plus SGLang's receiving side); the trainer is a 2-rank TP=2 torchrun
(tests/dist/dsync_worker.py) whose "runs" are new client objects, as a rerun or a resume has.
What is checked, by counts (the requests each server saw, in order, with the status it answered,
and which phase raised on which rank), never by wall-clock time:

- the weight-update session (SGLang >= 0.5.21 refuses updates outside one): begin, the buckets,
  end, on the servers that have sessions and on no other; a session left open by a crashed
  client is ended and opened again;
- the group's lifecycle: ``close()`` destroys the group on the servers, each run names its group
  afresh, so a second run after a normal end or after a crash (no ``close()``) joins at once;
- failures: a server refusing ``/init_weights_update_group`` (the real "already been created"
  400) or one bucket fails the push on every rank with that server's message, without waiting
  for the store, the broadcast or the group's timeout; the next push destroys what the failed
  one left on the servers.

The worker runs with ``weight_timeout_s: 600``: a sync that waits on a store or a broadcast
instead of failing would run into the test's own time limit (``LIMIT_S``) and fail there.

Run: ``pytest -m dist tests/test_sglang_weight_lifecycle.py`` (torchrun, a few minutes).
"""

from __future__ import annotations

import json

import pytest

from tests.dist.ckpt_models import make_hf_model
from tests.launch import ROOT, torchrun
from tests.sglang_receivers import dump_weights, receiver_pool

WORKER = ROOT / "tests" / "dist" / "dsync_worker.py"
LIMIT_S = 300  # a worker run takes well under a minute; a hang stops here
INIT, DESTROY = "/init_weights_update_group", "/destroy_weights_update_group"
BEGIN, END, UPDATE = "/begin_weight_update", "/end_weight_update", "/update_weights_from_distributed"
WEIGHT_PATHS = {INIT, DESTROY, BEGIN, END, UPDATE}


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_hf_model("qwen3_moe", tmp_path_factory.mktemp("hf"))


@pytest.fixture
def receivers(tmp_path):
    with receiver_pool(tmp_path) as start:
        yield start


def run_trainer(hf, out, runs, *, crash=False) -> list[list[dict]]:
    """One torchrun of the worker; the outcomes of its pushes, per rank."""
    torchrun(WORKER, "--hf", hf, "--out", out, "--runs", json.dumps(runs), *(["--crash"] if crash else []),
             nproc=2, timeout=LIMIT_S)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def seen(url, tmp_path) -> tuple[list[tuple[str, int]], dict]:
    """The weight-endpoint requests the server at ``url`` saw, in order, with their statuses."""
    dump = dump_weights(url, tmp_path / "dump.pt")
    return [(path, status) for path, status in dump["requests"] if path in WEIGHT_PATHS], dump


def send(url, path, body=None):
    """A request from another client (a trainer that crashed, say)."""
    from sapo_megatron.rollout.sglang.transport import Transport

    t = Transport(concurrency=1, retries=0, backoff_s=0, api_key_env="X_NONE", admin_api_key_env="X_NONE")
    try:
        return t.call_json(url, path, {} if body is None else body, timeout=30)
    finally:
        t.close()


def updates(requests) -> int:
    return sum(path == UPDATE for path, _ in requests)


@pytest.mark.dist
@pytest.mark.slow
def test_push_runs_in_a_session_on_servers_that_have_them(receivers, hf, tmp_path):
    new, old, left_open = receivers(["--version", "0.5.23"], ["--version", "0.5.20"], ["--version", "0.5.21"])
    assert send(left_open, BEGIN)["success"]  # a client that crashed inside a sync left its session open
    ranks = run_trainer(hf, tmp_path / "out", [{"urls": [new, old, left_open]}])
    for outcomes in ranks:
        assert [o["ok"] for o in outcomes] == [True], outcomes
    n = None
    for url in (new, old, left_open):
        requests, dump = seen(url, tmp_path)
        assert dump["version"] == "1" and dump["weights"] and not dump["session_open"], url
        n = n or updates(requests)
        assert n > 1 and updates(requests) == n, (url, requests)  # several buckets, to every server
        assert all(status == 200 for path, status in requests if path == UPDATE), (url, requests)
    flow = [(INIT, 200), (BEGIN, 200), *[(UPDATE, 200)] * n, (END, 200)]
    assert seen(new, tmp_path)[0][: len(flow)] == flow
    assert seen(old, tmp_path)[0][: n + 1] == [(INIT, 200), *[(UPDATE, 200)] * n]  # 0.5.20: no session
    assert not {BEGIN, END} & {path for path, _ in seen(old, tmp_path)[0]}
    # The open session was refused, ended and opened again, with a warning.
    recovered = [(BEGIN, 200), (INIT, 200), (BEGIN, 400), (END, 200), (BEGIN, 200), *[(UPDATE, 200)] * n, (END, 200)]
    assert seen(left_open, tmp_path)[0][: len(recovered)] == recovered


@pytest.mark.dist
@pytest.mark.slow
def test_a_second_run_joins_the_same_servers_after_a_close_and_after_a_crash(receivers, hf, tmp_path):
    a, b = receivers([], [])
    # Process 1: a run that ends normally, then a second run (new objects) that crashes (no close()).
    first = run_trainer(hf, tmp_path / "one", [{"urls": [a, b]}, {"urls": [a, b], "close": False}], crash=True)
    # Process 2: the next run, straight after, against the same servers.
    second = run_trainer(hf, tmp_path / "two", [{"urls": [a, b]}])
    for outcomes in zip(first[0] + second[0], first[1] + second[1]):
        assert all(o["ok"] for o in outcomes), outcomes  # both ranks, every run
    groups = [o["group"] for o in first[0] + second[0]]
    assert len(set(groups)) == 3, groups  # every run names its group afresh
    for url in (a, b):
        requests, dump = seen(url, tmp_path)
        assert [p for p, _ in requests if p in (INIT, DESTROY)] == [INIT, DESTROY, INIT, INIT, DESTROY], requests
        assert all(status == 200 for _, status in requests), requests
        assert dump["groups"] == [groups[1]]  # only the crashed run's group is left (its name collides with none)
        assert dump["version"] == "1" and not dump["session_open"]


@pytest.mark.dist
@pytest.mark.slow
def test_a_refused_init_fails_the_push_at_once_with_the_servers_message(receivers, hf, tmp_path):
    a, b = receivers([], [])
    # A run that crashed left its group on b under a name the next run reuses (a pinned token:
    # the real name clash of a rerun before names were unique).
    run_trainer(hf, tmp_path / "crashed", [{"urls": [b], "token": "pinned", "close": False}], crash=True)
    # b refuses the init at once (400); a has joined the rendezvous and waits there for b.
    ranks = run_trainer(hf, tmp_path / "next", [{"urls": [a, b], "token": "pinned"}, {"urls": [a, b]}])
    for refused, fresh in ranks:  # every rank raised, in the join, with b's own message
        assert not refused["ok"] and "joining the weight-sync group" in refused["error"], refused
        assert b in refused["error"] and "The specified group name has already been created" in refused["error"]
        assert fresh["ok"], fresh  # a new name joins both at once: nothing was left waiting on either
    requests_a, _ = seen(a, tmp_path)
    requests_b, _ = seen(b, tmp_path)
    # a's init ended as soon as the trainer gave up (the store went away), not at its group's
    # timeout; neither refusing server was asked to destroy a group it never joined.
    assert requests_a[:3] == [(INIT, 400), (INIT, 200), (BEGIN, 200)], requests_a
    crashed = requests_b.index((END, 200))  # the crashed run: init, begin, the buckets, end; no destroy
    assert requests_b[crashed + 1:crashed + 4] == [(INIT, 400), (INIT, 200), (BEGIN, 200)], requests_b


@pytest.mark.dist
@pytest.mark.slow
def test_a_refused_bucket_fails_the_push_on_every_rank_and_the_next_push_rebuilds(receivers, hf, tmp_path):
    # Gloo's broadcast tree over 4 ranks feeds rank 3 through rank 1. Rank 3 refuses the second
    # bucket without receiving it (its answer takes 0.5 s): rank 0's broadcast completes all the
    # same (ranks 1 and 2 took it), while rank 1 stays inside it, relaying to rank 3 for the
    # group's timeout. The push must neither wait for rank 1 nor send rank 3 the third bucket's
    # request, which would receive the second bucket's bytes.
    relay, old, refuser = receivers([], ["--version", "0.5.20"],
                                    ["--refuse-update-at", "2", "--refusal-delay-s", "0.5"])
    ranks = run_trainer(hf, tmp_path / "out", [{"urls": [relay, old, refuser], "pushes": 2}])
    for failed, next_push in ranks:  # every rank raised the refuser's own message
        assert not failed["ok"] and "weight update to version 1 failed" in failed["error"], failed
        assert refuser in failed["error"] and "Failed to receive weights: refused by the test" in failed["error"]
        assert next_push["ok"], next_push
        # The buckets were in shared memory (rank 1 wrote its slices there), and the failed push
        # left no file of theirs in /dev/shm (unlinked once mapped, at the first push).
        assert failed["shm_files"] == [] and next_push["shm_files"] == [], (failed, next_push)
    assert 0 < ranks[1][0]["shared_bytes"] < ranks[1][1]["shared_bytes"]  # both pushes wrote
    assert ranks[0][1]["group"] != ranks[0][0]["group"]  # a new group (rank 0 holds the names)
    for url in (relay, old, refuser):
        requests, dump = seen(url, tmp_path)
        destroyed = requests.index((DESTROY, 200))  # the failed push's group, destroyed at once
        session = url != old
        assert [p for p, _ in requests[:2]] == [INIT, BEGIN if session else UPDATE], (url, requests)
        # No request for the third bucket went out before the second one's answers were in.
        assert updates(requests[:destroyed]) == 2, (url, requests)
        if session:  # ended after the group, still in the failed push
            assert requests[destroyed + 1] == (END, 200), (url, requests)
        assert requests[-1] == (DESTROY, 200) and dump["groups"] == [], (url, requests)  # close()
        assert dump["version"] == "2" and not dump["session_open"], url
    assert seen(refuser, tmp_path)[0][3] == (UPDATE, 400)
    # Released from the broadcast when the refuser's side of the group went, not by its timeout.
    assert seen(relay, tmp_path)[0][3] == (UPDATE, 400)


@pytest.mark.parametrize("version", ["0.5.20", "0.5.21", "0.5.23"])
def test_mock_weight_update_session_follows_the_release_it_plays(version):
    """The mock's session, as read from each release's source (see tests/sglang_mock.py): the
    session test above is only as good as this."""
    from sapo_megatron.rollout.sglang.transport import ServerConfigError
    from tests.sglang_mock import Behaviour, MockSGLang

    update = {"names": ["w"], "dtypes": ["float32"], "shapes": [[1]], "group_name": "g"}
    with MockSGLang(Behaviour(version=version)) as mock:
        post = lambda path, body=None: send(mock.url, path, body)  # noqa: E731
        # Updates name a group that exists (an unknown one is refused, as SGLang does).
        assert post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                                   "world_size": 2, "group_name": "g"})["success"]
        if version == "0.5.20":
            for path in (BEGIN, END):
                with pytest.raises(ServerConfigError) as err:
                    post(path)
                assert err.value.status == 404
            assert post(UPDATE, update)["success"]  # no gate before 0.5.21
            return
        refused = post(UPDATE, update)
        assert refused == {"success": False, "message": "update_weights_from_distributed must run between "
                                                        "begin_weight_update() and end_weight_update()"}
        assert post(END) == {"success": False, "message": "no weight-update session is open; call "
                                                          "begin_weight_update() first"}
        assert post(BEGIN) == {"success": True, "message": "Success"}
        assert post(BEGIN)["message"] == "a weight-update session is already open; call end_weight_update() first"
        assert post(UPDATE, {**update, "weight_version": "3"}) == {
            "success": True, "message": "Succeeded to update parameter online. Weight version updated to 3."}
        assert post(END) == {"success": True, "message": "Success"}
        assert not post("/update_weights_from_tensor", {"serialized_named_tensors": []})["success"]
        statuses = [r["status"] for r in mock.requests]
        assert statuses == [200, 400, 400, 200, 400, 200, 200, 400]  # every refusal is an HTTP 400


def test_join_gives_up_at_once_and_leaves_no_thread():
    """Rank 0's side of a group whose only server never joins (it refused): the join waits in
    the store until ``give_up()`` says so, then ends, its thread gone, although the group's
    timeout is 10 minutes. Counted by polls, not timed."""
    import threading
    from datetime import timedelta

    from sapo_megatron.rollout.sglang.weight_sync import group

    polls = []

    def give_up():
        polls.append(1)
        return len(polls) >= 20  # the thread is inside the store's wait by now

    with pytest.raises(group.JoinAbandoned, match="gave up joining weight-sync group lonely"):
        rendezvous = group.Rendezvous("127.0.0.1", group.free_port(), timedelta(minutes=10))
        group.join(rendezvous, backend="gloo", world_size=2, group_name="lonely", give_up=give_up)
    assert len(polls) == 20
    assert not [t for t in threading.enumerate() if t.name.startswith("weight-sync join")]
