"""One SAPO step of a tiny MoE GPTModel under TP/SP, PP, EP and TP x EP equals the single-rank step.

Each layout runs for real under ``torchrun`` with gloo (tests/dist/step_worker.py). The
single-rank run saves its initial weights; every parallel run loads them into its own sharding,
so all runs start from the same network and see the same global batch. We compare the full
gradient of every parameter after the step (Megatron DDP + finalize_model_grads included).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launch import torchrun

WORKER = Path(__file__).parent / "dist" / "step_worker.py"
pytestmark = [pytest.mark.dist, pytest.mark.slow]

# float32 throughout: sharding changes only the order of float32 additions (split matmuls,
# all-reduces, a different sum over microbatches), which moves results by a few ulp of the
# accumulated magnitudes, ~1e-7..1e-6 relative. A real error (a missing all-reduce, a wrong
# normalisation, a misrouted token) is >= 1e-2 relative. 1e-4 separates the two by two
# orders of magnitude either way.
REL_TOL = 1e-4


def _run(nproc: int, out: Path, *args: str) -> dict:
    torchrun(WORKER, "--out", out, *args, nproc=nproc)
    return torch.load(out)


def _rel_errors(got: dict, ref: dict) -> dict[str, float]:
    assert set(got) == set(ref), f"parameter sets differ: {sorted(set(got) ^ set(ref))}"
    errors = {}
    for name, r in ref.items():
        g = got[name]
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} vs reference {tuple(r.shape)}"
        errors[name] = float((g - r).norm() / r.norm().clamp_min(1e-30))
    return errors


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist_step")


@pytest.fixture(scope="module")
def reference(workdir):
    """Single-rank, single-microbatch gradients per reduction (weights saved once)."""
    weights = workdir / "weights.pt"
    cache = {}

    def get(reduction: str, loss: str = "sapo") -> dict:
        if (reduction, loss) not in cache:
            args = ["--reduction", reduction, "--loss", loss, "--log-probs"]
            args += ["--weights", str(weights)] if weights.exists() else ["--save-weights", str(weights)]
            cache[reduction, loss] = _run(1, workdir / f"ref_{reduction}_{loss}.pt", *args)
        return cache[reduction, loss]

    get("seq_mean_token_mean")
    return weights, get


LAYOUTS = {
    "tp2_sp": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "ep2": (2, ["--ep", "2"]),
    "tp2_ep2": (4, ["--tp", "2", "--ep", "2"]),
}


@pytest.mark.parametrize("reduction", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_parallel_gradients_equal_single_rank(reference, workdir, layout, reduction):
    weights, get_ref = reference
    ref = get_ref(reduction)
    nproc, args = LAYOUTS[layout]
    got = _run(nproc, workdir / f"{layout}_{reduction}.pt", *args, "--reduction", reduction,
               "--weights", str(weights))
    errors = _rel_errors(got["grads"], ref["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < REL_TOL, f"{layout}/{reduction}: {worst} rel err {errors[worst]:.2e}"
    # The reported step loss is the exact global loss, whatever the split.
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=REL_TOL)
    assert got["metrics"]["num_tokens"] == ref["metrics"]["num_tokens"]


def test_unfused_logprobs_under_tp2_sp_equal_the_fused_single_rank_step(reference, workdir):
    """loss.fused_logprobs=false (the output layer's logits, then vocab_parallel_log_probs) under
    TP=2 + SP gives the log-probs, loss and gradients of the default fused single-rank step: the
    fused path's hidden gradient, completed by Megatron's SP reduce-scatter, and its weight
    gradient are the output layer's. Same float32 tolerance (REL_TOL) as the layouts above."""
    weights, get_ref = reference
    ref = get_ref("seq_mean_token_mean")
    got = _run(2, workdir / "tp2_sp_unfused.pt", "--tp", "2", "--unfused", "--log-probs", "--weights", str(weights))
    errors = _rel_errors(got["grads"], ref["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < REL_TOL, f"unfused tp2_sp: {worst} rel err {errors[worst]:.2e}"
    assert got["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=REL_TOL)
    got_lp, ref_lp = torch.cat(got["log_probs"]), torch.cat(ref["log_probs"])
    assert got_lp.shape == ref_lp.shape and float(ref_lp.abs().max()) > 1.0  # guard: real log-probs
    torch.testing.assert_close(got_lp, ref_lp, rtol=REL_TOL, atol=REL_TOL)  # float32 sum orders only


@pytest.mark.parametrize(
    "nproc,args",
    [(1, ["--microbatches", "4"]), (2, ["--pp", "2", "--microbatches", "4"])],
    ids=["single_rank_4mb", "pp2_1f1b_4mb"],
)
def test_microbatch_split_does_not_change_gradients(reference, workdir, nproc, args):
    weights, get_ref = reference
    ref = get_ref("seq_mean_token_mean")
    got = _run(nproc, workdir / f"mb_{nproc}.pt", *args, "--weights", str(weights))
    errors = _rel_errors(got["grads"], ref["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < REL_TOL, f"{args}: {worst} rel err {errors[worst]:.2e}"


@pytest.mark.parametrize("loss", ["sapo", "sapo_seq"])
def test_packed_layout_equals_padded(reference, workdir, loss):
    """THD packing (block-diagonal causal mask on CPU) gives the padded batch's gradients.

    ``sapo_seq`` checks that sequence-level ratios are taken per packed sample, not per row.
    """
    weights, get_ref = reference
    ref = get_ref("seq_mean_token_mean", loss)
    got = _run(1, workdir / f"packed_{loss}.pt", "--layout", "packed", "--microbatches", "2",
               "--loss", loss, "--weights", str(weights))
    errors = _rel_errors(got["grads"], ref["grads"])
    worst = max(errors, key=errors.get)
    assert errors[worst] < REL_TOL, f"packed: {worst} rel err {errors[worst]:.2e}"


def test_gradients_are_not_trivial(reference):
    """Guard against a vacuous comparison: the reference step has real, finite gradients."""
    _, get_ref = reference
    ref = get_ref("seq_mean_token_mean")
    norms = {n: float(g.norm()) for n, g in ref["grads"].items()}
    assert all(torch.isfinite(torch.tensor(list(norms.values()))))
    router = [v for n, v in norms.items() if n.endswith("router.weight")]
    experts = [v for n, v in norms.items() if "local_experts" in n]
    assert router and min(router) > 0, "router weights got no gradient"
    assert experts and min(experts) > 0, "some expert got no gradient (routing too uneven?)"
    assert norms["output_layer.weight"] > 0 and norms["embedding.word_embeddings.weight"] > 0


def test_overlapped_param_gather_needs_and_gets_sync_params(tmp_path):
    """GPUs overlap the sharded optimizer's parameter all-gather with the next forward: right
    after the step, the shards other ranks updated are still the old ones, so anything that reads
    weights without a forward (weight sync, checkpoint, the engine's copy) must call
    ``sync_params`` first; after it, the weights equal a synchronous gather's bit for bit."""
    out = tmp_path / "overlap.pt"
    torchrun(Path(__file__).parent / "dist" / "overlap_worker.py", "--out", out, nproc=2)
    runs = torch.load(out)
    names = sorted(runs["start"])

    def moved(a, b) -> list[str]:
        return [n for n in names if not torch.equal(runs[a][n], runs[b][n])]

    assert moved("sync", "start") == names, "guard: the step must move every parameter"
    stale = [n for n in names if n not in moved("overlap", "start")]
    # DP=2: rank 0 updated its own shard in place; the other shard waits for the gather.
    assert stale and moved("overlap", "start"), "expected part updated, part stale before the gather"
    assert moved("synced", "sync") == [], "sync_params must bring every parameter to the step's result"
