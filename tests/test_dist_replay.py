"""R3 routing replay: rollout routes (SGLang wire format) replayed in Megatron-Core's parallel step.

A perturbed copy of a tiny MoE acts as the rollout engine and records its routes token by
token (tests/dist/replay_worker.py --generate). Every training layout then checks:
- with replay, the routes each router used equal the rollout's routes for every token but
  each sample's last one (never routed by the rollout engine: live fallback);
- the replayed log-probs equal the single-rank replayed log-probs (the log-probs computed
  under those routes), and the replayed step's gradients equal the single-rank ones,
  including under PP 1F1B with 4 microbatches and with activation recomputation (whose
  backward must replay the same routes, or the gradients would differ);
- without replay, the live routing disagrees with the rollout on a visible fraction of tokens
  (recorded in the test output; the perturbation makes the mismatch real);
- uneven pipeline stages (5 layers at PP=2, split 2/3, and 1/4 with a first stage holding only
  the dense layer) replay and train as one rank does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

WORKER = Path(__file__).parent / "dist" / "replay_worker.py"
pytestmark = [pytest.mark.dist, pytest.mark.slow]

# Same reasoning as test_dist_step.py: only float32 summation order differs between layouts.
REL_TOL = 1e-4
# Log-probs of ~-4 in float32 through 4 layers: ~1e-6 absolute differences between layouts.
LOGP_ATOL = 1e-5


def _generate(tmp_path_factory, *args: str):
    d = tmp_path_factory.mktemp("replay")
    weights, samples = d / "weights.pt", d / "samples.pt"
    torchrun(WORKER, "--generate", "--weights", weights, "--samples", samples, *args, nproc=1)
    return d, weights, samples, args


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    return _generate(tmp_path_factory)


def _run(rollout, name: str, nproc: int, *args: str) -> dict:
    d, weights, samples, model_args = rollout
    out = d / f"{name}.pt"
    torchrun(WORKER, "--weights", weights, "--samples", samples, "--out", out, *model_args, *args, nproc=nproc)
    return torch.load(out, weights_only=False)


def _per_sample(result: dict, key: str) -> dict[int, object]:
    """Merge per-rank per-sample results (PP stages and TP ranks repeat; DP ranks differ)."""
    merged = {}
    for part in result["per_rank"]:
        for sid, value in zip(part["ids"], part[key]):
            merged.setdefault(sid, value)
    return merged


def _used_routes(result: dict) -> dict[int, torch.Tensor]:
    """Routes used per sample, each MoE layer taken from a rank that owns it."""
    merged: dict[int, torch.Tensor] = {}
    for part in result["per_rank"]:
        for sid, routes in zip(part["ids"], part["used"]):
            # int64: -1 marks a layer no rank filled (routes come back in a compact unsigned dtype).
            base = merged.setdefault(sid, torch.full(routes.shape, -1, dtype=torch.long))
            for layer in part["layers"]:
                column = layer - 1  # tiny model: layer 0 is dense, MoE layers 1.. -> columns 0..
                base[:, column] = routes[:, column].long()
    return merged


@pytest.fixture(scope="module")
def single(rollout):
    return _run(rollout, "single", 1)


LAYOUTS = {
    "single": (1, []),
    "tp2_sp_2mb": (2, ["--tp", "2", "--microbatches", "2"]),
    "pp2_4mb": (2, ["--pp", "2", "--microbatches", "4"]),
    "ep2": (2, ["--ep", "2"]),
    "recompute": (1, ["--recompute", "full", "--microbatches", "2"]),
    # Recompute settings whose routers do not all run twice (issue 19, finding 3: these crashed
    # at the end of every step before the replay saw checkpoints at run time).
    "recompute_block1": (1, ["--recompute", "block1", "--microbatches", "2"]),
    "recompute_moe": (1, ["--recompute", "moe", "--microbatches", "2"]),
    "recompute_core_attn": (1, ["--recompute", "core_attn", "--microbatches", "2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_r3_replays_rollout_routes(rollout, single, layout, record_property):
    nproc, args = LAYOUTS[layout]
    got = single if layout == "single" else _run(rollout, layout, nproc, *args)
    _check_replay(got, single, layout, record_property, num_moe=3)


@pytest.fixture(scope="module")
def five_layers(tmp_path_factory):
    rollout = _generate(tmp_path_factory, "--num-layers", "5")
    return rollout, _run(rollout, "single", 1)


UNEVEN = {
    # first stage: dense layer 0 and MoE layer 1; last: MoE layers 2, 3, 4
    "first2": (["--pp-first", "2"], [[0, 1], [2, 3, 4]]),
    # first stage holds only the dense layer: a stage with no router at all
    "last4": (["--pp-last", "4"], [[0], [1, 2, 3, 4]]),
}


@pytest.mark.parametrize("split", list(UNEVEN))
def test_r3_uneven_pipeline_stages(five_layers, split, record_property):
    """5 layers at PP=2 split unevenly, against one rank: each stage replays the routes of its
    own layers, found by their global index, and the step's gradients are the single rank's."""
    rollout, single = five_layers
    args, expected = UNEVEN[split]
    got = _run(rollout, f"pp2_{split}", 2, "--pp", "2", *args, "--microbatches", "4")
    # Not vacuous: the stages really are uneven (an even split of 5 layers would be refused).
    assert sorted(part["stage_layers"] for part in got["per_rank"]) == expected
    assert sorted(part["layers"] for part in got["per_rank"]) == [[i for i in stage if i] for stage in expected]
    assert single["per_rank"][0]["stage_layers"] == [0, 1, 2, 3, 4]
    _check_replay(got, single, f"pp2_{split}", record_property, num_moe=4)
    # Every layer of both stages received a gradient (a stage left out would compare zeros).
    for layer in range(5):
        norm = sum(float(g.norm()) for n, g in got["grads"].items() if f"decoder.layers.{layer}." in n)
        assert norm > 0, f"layer {layer} has no gradient"


def _check_replay(got, single, layout, record_property, *, num_moe):
    rollout_routes = got["rollout_routes"]
    used = _used_routes(got)
    assert sorted(used) == list(range(len(rollout_routes)))
    for sid, routes in used.items():
        expected = rollout_routes[sid].long()
        assert routes.shape == expected.shape
        assert (routes >= 0).all(), f"sample {sid}: some MoE layer was not covered by any rank"
        assert torch.equal(routes, expected), f"{layout}: sample {sid} did not replay the rollout routes"

    stats = got["replay_stats"]
    num_tokens = sum(r.shape[0] + 1 for r in rollout_routes)
    assert stats["routing/fallback_frac"] == pytest.approx(len(rollout_routes) / num_tokens)
    assert stats["routing/coverage"] == pytest.approx(1 - len(rollout_routes) / num_tokens)

    live = got["agreement_live"]["routing/agreement_mean"]
    record_property("live_routing_agreement", live)
    print(f"{layout}: live-vs-rollout routing agreement {live:.3f}")
    assert 0.0 < live < 0.999, "the perturbed rollout policy should route some tokens differently"
    # While replaying, agreement compares the router's live choice on the replayed network with
    # the replayed routes; it is a fraction, reported per layer.
    assert 0.0 < stats["routing/agreement_mean"] <= 1.0
    assert {f"routing/agreement_moe{c}" for c in range(num_moe)} <= set(stats)

    ref_lp, lp = _per_sample(single, "replay_lp"), _per_sample(got, "replay_lp")
    live_lp = _per_sample(got, "live_lp")
    differs = 0.0
    for sid in ref_lp:
        assert torch.allclose(lp[sid], ref_lp[sid], atol=LOGP_ATOL), f"{layout}: sample {sid} log-probs"
        differs = max(differs, float((live_lp[sid] - lp[sid]).abs().max()))
    assert differs > 1e-3, "replaying different routes must change some log-probs"

    assert set(got["grads"]) == set(single["grads"]), f"{layout}: gathered gradients miss parameters"
    errors = {n: float((g - single["grads"][n]).norm() / single["grads"][n].norm().clamp_min(1e-30))
              for n, g in got["grads"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < REL_TOL, f"{layout}: {worst} gradient rel err {errors[worst]:.2e}"
