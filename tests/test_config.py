"""The run configuration: precedence, aliases, refusals with dotted keys, world/model checks,
resolved-config round trip, secret redaction, and every shipped YAML."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from sapo_megatron.config import (
    ConfigError,
    ModelSection,
    TrainConfig,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    load_config,
    redact,
    save_resolved,
    to_saved_dict,
    validate_for_world,
)
from sapo_megatron.config import run_config_command
from sapo_megatron.losses import PolicyLossConfig
from sapo_megatron.rollout.base import SamplingParams
from sapo_megatron.step.run import PolicyLossSpec

REPO = Path(__file__).resolve().parents[1]
# A small RL config for the config machinery (the demo's configs/tiny_cpu.yaml is tuned on its own).
TINY = REPO / "tests" / "configs" / "tiny_rl.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, {"run": {"steps": 7, "seed": 5}, "loss": {"tau_neg": 1.2},
                            "optim": {"lr": "1e-4"}, "model": {"hidden_size": 32}})
    cfg = load_config(path, ["loss.tau_neg=1.3", "optim.lr=1e-6", "rollout.sglang.urls=[http://a:1,http://b:2]"])
    assert cfg.run.steps == 7 and cfg.run.seed == 5  # YAML over defaults
    assert cfg.run.save_every == TrainConfig().run.save_every  # untouched default
    assert cfg.loss.tau_neg == 1.3 and cfg.optim.lr == 1e-6  # overrides over YAML; "1e-6" is a float
    assert cfg.rollout.sglang.urls == ["http://a:1", "http://b:2"]
    model = cfg.model.resolve()
    assert model.hidden_size == 32 and model.num_experts == 4  # the preset under the YAML fields


def test_derived_defaults_stay_derived(tmp_path):
    # sequence_parallel follows TP unless set: a YAML that only sets TP=2 must get SP on.
    cfg = load_config(write(tmp_path, {"parallel": {"tensor_model_parallel_size": 2}}))
    assert cfg.parallel.sequence_parallel is True
    assert load_config(None, ["parallel.sequence_parallel=false"]).parallel.sequence_parallel is False


def test_aliases_and_override_text():
    cfg = load_config(None, ["output_dir=2024", "seed=3", "task.options.level=2"])
    assert cfg.run.output_dir == "2024"  # a str field keeps the text as typed
    assert cfg.run.seed == 3 and cfg.task.options == {"level": 2}
    cfg = config_from_argv(["--config", str(TINY), "output_dir=/tmp/x", "seed=4"])
    assert (cfg.run.output_dir, cfg.run.seed, cfg.model.resolve().vocab_size) == ("/tmp/x", 4, 16)
    with pytest.raises(ConfigError, match="expected --config PATH or key.sub=value"):
        config_from_argv(["--tau", "1"])


@pytest.mark.parametrize("source", ["yaml", "override"])
def test_unknown_keys_named_with_suggestions(tmp_path, source):
    if source == "yaml":
        args = (write(tmp_path, {"loss": {"tau_nge": 1.0}, "rollut": {}}), [])
    else:
        args = (None, ["loss.tau_nge=1.0", "rollut.engine=sglang"])
    with pytest.raises(ConfigError) as err:
        load_config(*args)
    message = str(err.value)
    assert "unknown key 'loss.tau_nge'; did you mean 'loss.tau_neg'?" in message
    assert "valid keys under loss:" in message and "tau_pos" in message
    assert "unknown key 'rollut'; did you mean 'rollout'" in message


def test_unknown_upstream_passthrough_keys():
    with pytest.raises(ConfigError, match=r"'model.megatron.recompute_granulrity'; did you mean "
                                          r"'model.megatron.recompute_granularity'"):
        load_config(None, ["model.megatron.recompute_granulrity=full"])
    with pytest.raises(ConfigError, match="'optim.megatron.use_distributed_optimzer'"):
        load_config(None, ["optim.megatron.use_distributed_optimzer=true"])
    # Megatron-Core's own TransformerConfig checks run at load time too.
    with pytest.raises(ConfigError, match='recompute_method must be "block" or "uniform"'):
        load_config(None, ["model.megatron.recompute_granularity=full"])
    cfg = load_config(None, ["model.megatron={recompute_granularity: full, recompute_method: uniform, recompute_num_layers: 1}",
                             "optim.megatron.use_distributed_optimizer=true"])
    assert cfg.model.resolve().megatron["recompute_method"] == "uniform"
    assert cfg.optim.megatron == {"use_distributed_optimizer": True}


def test_wrong_types_all_reported():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["run.steps=abc", "run.resume=maybe", "rollout.engine=vllm",
                           "loss.tau_pos=[1]", "model.num_experts=2.5"])
    message = str(err.value)
    assert "run.steps: expected an integer, got 'abc'" in message
    assert "run.resume: expected true or false, got 'maybe'" in message
    assert "rollout.engine: expected one of ['embedded', 'sglang', 'recorded'], got 'vllm'" in message
    assert "loss.tau_pos: expected a number, got '[1]'" in message
    assert "model.num_experts: expected an integer, got '2.5'" in message
    with pytest.raises(ConfigError, match=r"loss.type must be one of \['dual_clip', 'grpo', .*got 'ppo'"):
        load_config(None, ["loss.type=ppo"])


@pytest.mark.parametrize("key", ["tau_pos", "tau_neg"])
@pytest.mark.parametrize("value", ["0", "-1.05", ".nan"])
def test_tau_not_positive_refused_with_dotted_key(key, value):
    with pytest.raises(ConfigError, match=rf"loss\.{key} must be a finite number > 0"):
        load_config(None, [f"loss.{key}={value}"])


def test_configured_tau_reaches_the_loss_spec():
    # loss: IS the step's PolicyLossSpec (and so a PolicyLossConfig): no copy between them.
    spec = load_config(None, ["loss.tau_pos=0.7", "loss.tau_neg=1.3", "loss.type=sapo_seq",
                              "loss.norm_length=64"]).loss
    assert isinstance(spec, PolicyLossSpec) and isinstance(spec, PolicyLossConfig)
    assert (spec.type, spec.tau_pos, spec.tau_neg, spec.norm_length) == ("sapo_seq", 0.7, 1.3, 64)


def test_merged_sections_validate_once(monkeypatch):
    # loss and rollout were each a config class plus the runtime class it was copied into, and
    # validated in both; now each is one class whose check runs once per load.
    calls = {"loss": 0, "sampling": 0}
    loss_validate, sampling_post_init = PolicyLossSpec.validate, SamplingParams.__post_init__

    def count_loss(self):
        calls["loss"] += 1
        loss_validate(self)

    def count_sampling(self):
        calls["sampling"] += 1
        sampling_post_init(self)

    load_config(None)  # the schema (built once, from the defaults) is not counted
    monkeypatch.setattr(PolicyLossSpec, "validate", count_loss)
    monkeypatch.setattr(SamplingParams, "__post_init__", count_sampling)
    cfg = load_config(None, ["loss.tau_neg=1.2", "rollout.top_p=0.9"])
    assert calls == {"loss": 1, "sampling": 1}
    assert isinstance(cfg.rollout, SamplingParams) and cfg.rollout.top_p == 0.9
    with pytest.raises(ConfigError, match=r"^rollout.top_p must be in \(0, 1\], got 1.5$"):
        load_config(None, ["rollout.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"^loss.temperature must be > 0, got 0.0$"):
        load_config(None, ["loss.temperature=0"])


def test_sampling_params_of_a_step():
    cfg = load_config(None, ["rollout.stop_token_ids=[7]", "rollout.max_new_tokens=5"]).rollout
    params = cfg.sampling_params(stop_token_ids=(3, 7), run_seed=2, step=5)
    assert type(params) is SamplingParams
    assert (params.stop_token_ids, params.max_new_tokens, params.seed) == ((7, 3), 5, 2 * 1_000_003 + 5)
    # rollout.seed, when set, replaces run.seed as the root of the per-step seeds.
    seeded = load_config(None, ["rollout.seed=9"]).rollout
    assert seeded.sampling_params(run_seed=2, step=5).seed == 9 * 1_000_003 + 5
    assert seeded.sampling_params().seed is None


def test_uneven_pipeline_stages_accepted():
    cfg = load_config(None, ["model.num_hidden_layers=3", "parallel.pipeline_model_parallel_size=2",
                             "parallel.num_layers_in_last_pipeline_stage=1"])
    assert cfg.parallel.stage_layers(3) == [2, 1]


def test_model_and_parallel_sizes_refused():
    with pytest.raises(ConfigError, match=r"num_attention_heads \(4\) is not divisible by tensor_model_parallel_size \(3\)"):
        load_config(None, ["parallel.tensor_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"num_hidden_layers \(2\) is not divisible by pipeline"):
        load_config(None, ["parallel.pipeline_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"num_experts \(4\) is not divisible by expert_model_parallel_size \(3\)"):
        load_config(None, ["parallel.expert_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"num_hidden_layers \(3\) minus parallel.num_layers_in_last_pipeline_stage \(2\) "
                       r"leaves 1 layers for the 2 middle stage"):
        load_config(None, ["model.num_hidden_layers=3", "parallel.pipeline_model_parallel_size=3",
                           "parallel.num_layers_in_last_pipeline_stage=2"])
    with pytest.raises(ConfigError, match="parallel.tensor_model_parallel_size must be a positive integer"):
        load_config(None, ["parallel.tensor_model_parallel_size=0"])


def test_sizes_against_the_world():
    cfg = load_config(None, ["parallel.tensor_model_parallel_size=2"])
    plan = validate_for_world(cfg, 4)  # DP 2; 16 x 8 = 128 -> 2 x 64 -> 32 per rank -> 4 x 8
    assert (plan.data_parallel_size, plan.minibatch_size, plan.samples_per_rank, plan.num_microbatches) == (2, 64, 32, 4)
    with pytest.raises(ConfigError, match=r"world size 3 is not divisible by parallel.tensor x pipeline x context = 2 x 1 x 1 = 2"):
        validate_for_world(cfg, 3)
    cfg = load_config(None, ["parallel.expert_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"expert_tensor x expert_model x pipeline = 1 x 4 x 1 = 4"):
        validate_for_world(cfg, 2)
    cfg = load_config(None, ["rollout.prompts_per_step=3", "rollout.samples_per_prompt=4",
                             "train.updates_per_rollout=2", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match=r"minibatches of 6: a minibatch must be divisible by data-parallel size x "
                                          r"train.micro_batch_size = 1 x 4 = 4"):
        validate_for_world(cfg, 1)
    with pytest.raises(ConfigError, match="do not split into train.updates_per_rollout=5"):
        validate_for_world(load_config(None, ["train.updates_per_rollout=5"]), 1)


def test_cross_section_refusals():
    cases = {
        "routing.mode=R3 replays MoE routes, but the model has no MoE layers": ["routing.mode=R3", "model.num_experts=0"],
        "rollout.engine=sglang needs rollout.sglang.urls": ["rollout.engine=sglang"],
        "loss.kl_coef=0.1 needs a reference model": ["loss.kl_coef=0.1"],
        "loss.temperature (0.7) differs from rollout.temperature (1.0)": ["loss.temperature=0.7"],
        "rollout.samples_per_prompt must be >= 2": ["rollout.samples_per_prompt=1"],
        # Upstream drops over-capacity tokens after the replayed top-k (issue 19, finding 5).
        "routing.mode=R2 with model.megatron.moe_expert_capacity_factor=1.0: the capacity drops tokens":
            ["routing.mode=R2", "model.megatron.moe_expert_capacity_factor=1.0"],
    }
    for expected, overrides in cases.items():
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            load_config(None, overrides)
    # Without replay a capacity factor is the user's choice.
    load_config(None, ["routing.mode=none", "model.megatron.moe_expert_capacity_factor=1.0"])
    # R3 with the SGLang engine is the production setting.
    cfg = load_config(None, ["routing.mode=R3", "rollout.engine=sglang", "rollout.sglang.urls=[http://h:30000]"])
    assert cfg.routing.mode == "R3"


def test_env_interpolation(tmp_path, monkeypatch):
    path = write(tmp_path, {"task": {"path": "${oc.env:MY_DATA}/train.jsonl"},
                            "run": {"output_dir": "${oc.env:MY_OUT,runs/x}"}})
    monkeypatch.setenv("MY_DATA", "/data")
    monkeypatch.delenv("MY_OUT", raising=False)
    cfg = load_config(path)
    assert (cfg.task.path, cfg.run.output_dir) == ("/data/train.jsonl", "runs/x")
    monkeypatch.setenv("MY_OUT", "/scratch/out")
    assert load_config(path).run.output_dir == "/scratch/out"  # the variable over its default
    # A typed field converts what the variable holds.
    monkeypatch.setenv("MY_STEPS", "12")
    assert load_config(path, ["run.steps=${oc.env:MY_STEPS}"]).run.steps == 12
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == ("task.path: environment variable MY_DATA is not set (the value is "
                              "'${oc.env:MY_DATA}/train.jsonl'); export MY_DATA or override task.path=...")


@pytest.mark.parametrize("old, new", [
    ("${MY_DATA}/train.jsonl", "${oc.env:MY_DATA}"),
    ("${MY_DATA:-/data}/train.jsonl", "${oc.env:MY_DATA,/data}"),
])
@pytest.mark.parametrize("source", ["yaml", "override"])
def test_shell_env_syntax_refused_with_the_new_spelling(tmp_path, monkeypatch, old, new, source):
    monkeypatch.setenv("MY_DATA", "/data")  # set or not, the old syntax is refused
    if source == "yaml":
        args = (write(tmp_path, {"task": {"path": old}}), [])
    else:
        args = (None, [f"task.path={old}"])
    with pytest.raises(ConfigError) as err:
        load_config(*args)
    reference = old.split("/train")[0]
    assert str(err.value) == (f"task.path: {reference!r} is the old environment-variable syntax; "
                              f"write {new!r} instead")
    # OmegaConf's own interpolation of a section's value still works.
    cfg = load_config(None, ["task.path=${run.output_dir}/prompts.jsonl"])
    assert cfg.task.path == "runs/tiny-cpu/prompts.jsonl"


def test_saved_config_keeps_env_references_and_no_secret(tmp_path, monkeypatch):
    secret = "hf_" + "q7Zt" * 8
    monkeypatch.setenv("MY_HF_TOKEN", secret)
    monkeypatch.setenv("MY_DATA", "/data")
    monkeypatch.setenv("MY_TOKENIZER", "/models/tok")
    path = write(tmp_path, {"task": {"path": "${oc.env:MY_DATA}/train.jsonl",
                                     "options": {"hf_token": "${oc.env:MY_HF_TOKEN}",
                                                 "tokenizer": "${oc.env:MY_TOKENIZER}"}},
                            "rollout": {"sglang": {"urls": ["http://${oc.env:MY_HOST,localhost}:30000"]}}})
    cfg = load_config(path, ["run.output_dir=${oc.env:MY_OUT,runs/env}"])
    assert cfg.task.options["hf_token"] == secret  # the run itself sees the value
    cfg.task.options["tokenizer"] = "/elsewhere"  # changed after loading: saved as it is now
    text = save_resolved(cfg, tmp_path / "run" / "config.yaml").read_text()
    assert secret not in text and "/data" not in text  # guard: the values were resolved above
    data = yaml.safe_load(text)
    assert data["task"]["path"] == "${oc.env:MY_DATA}/train.jsonl"
    assert data["task"]["options"]["hf_token"] == "${oc.env:MY_HF_TOKEN}"  # a name, not redacted
    assert data["task"]["options"]["tokenizer"] == "/elsewhere"
    assert data["rollout"]["sglang"]["urls"] == ["http://${oc.env:MY_HOST,localhost}:30000"]
    assert data["run"]["output_dir"] == "${oc.env:MY_OUT,runs/env}"
    # The saved file loads back to the same run where the same variables are set.
    monkeypatch.setenv("MY_DATA", "/data2")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again.task.path == "/data2/train.jsonl" and again.task.options["hf_token"] == secret
    assert again.rollout.sglang.urls == ["http://localhost:30000"]


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(TINY, ["loss.tau_neg=1.2", "task.options.level=3"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    saved = save_resolved(cfg, tmp_path / "run" / "config.yaml")
    data = yaml.safe_load(saved.read_text())
    # Every field is written, the model fully resolved from its preset.
    assert set(data["model"]) >= {"preset", "vocab_size", "num_experts", "megatron", "rope_theta"}
    assert set(data["loss"]) >= {"tau_pos", "tau_neg", "type", "reduction", "kl_type"}
    again = load_config(saved)
    assert again.model.resolve() == cfg.model.resolve()
    assert config_to_dict(again, resolved=True) == config_to_dict(cfg, resolved=True)
    assert again.loss == cfg.loss and again.parallel == cfg.parallel and again.task == cfg.task


def test_secrets_never_saved(tmp_path):
    cfg = load_config(None, ["task.options.hf_token=hf_abcdefghijklmnopqrstuvwx",
                             "task.options.auth_header=Bearer xyz",
                             "task.options.endpoint=https://user:hunter2@example.com/v1",
                             "task.options.note=sk-ABCDEFGHIJKLMNOPQRSTU",
                             "rollout.engine=sglang", "rollout.sglang.urls=[http://h:30000]"])
    text = save_resolved(cfg, tmp_path / "config.yaml").read_text()
    for secret in ("hf_abcdefghijklmnopqrstuvwx", "xyz", "hunter2", "sk-ABCDEFGHIJKLMNOPQRSTU"):
        assert secret not in text
    data = yaml.safe_load(text)
    assert data["task"]["options"]["endpoint"] == "https://user:<redacted>@example.com/v1"
    # The environment variable's NAME stays; ordinary *token* settings are not secrets.
    assert data["rollout"]["sglang"]["api_key_env"] == "SGLANG_API_KEY"
    assert data["rollout"]["max_new_tokens"] == 8
    assert redact({"api_key_env": "sk-ABCDEFGHIJKLMNOPQRSTU"}) == {"api_key_env": "<redacted>"}
    # A key pasted where the variable name belongs is refused, and not echoed.
    with pytest.raises(ConfigError, match="rollout.sglang.api_key_env must be the NAME") as err:
        load_config(None, ["rollout.sglang.api_key_env=abc-123-secret"])
    assert "abc-123-secret" not in str(err.value)


SHIPPED = {  # config -> (world sizes it is meant for, overrides the launch scripts add)
    "tiny_cpu.yaml": ([2], []),
    "multiturn_cpu.yaml": ([2], []),  # the multi-turn demo (examples/run_multiturn_cpu.sh)
    "ablation_cpu.yaml": ([2], []),  # the sweep's grid (sapo_megatron/commands/sweep.py)
    "qwen3_30b_a3b_sapo.yaml": ([4], ["rollout.sglang.urls=[http://127.0.0.1:30000,http://127.0.0.1:30001]"]),
    "qwen3_235b_a22b_sapo.yaml": ([64], ["rollout.sglang.urls=[http://node009:30000]"]),
}
ENV = {"QWEN3_30B_A3B_HF_DIR": "/models/q30", "QWEN3_235B_A22B_HF_DIR": "/models/q235", "DAPO_MATH_PATH": "/data/dapo.parquet"}


def test_every_shipped_config_is_covered():
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load_and_validate(name, monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    worlds, overrides = SHIPPED[name]
    cfg = load_config(REPO / "configs" / name, overrides)
    for world in worlds:
        validate_for_world(cfg, world)
    assert (cfg.loss.type, cfg.loss.tau_pos, cfg.loss.tau_neg) == ("sapo", 1.0, 1.05)
    if name.startswith("qwen3"):
        assert cfg.rollout.samples_per_prompt == 16 and cfg.optim.lr == 1e-6
        assert (cfg.rollout.engine, cfg.routing.mode, cfg.model.resolve().params_dtype) == ("sglang", "R3", "bfloat16")
        assert cfg.task.path == "/data/dapo.parquet"
    else:
        # The model's vocabulary is the task's character tokenizer's (sampled ids must decode).
        from sapo_megatron.tasks import build_task
        from sapo_megatron.trainer.loop import task_options

        vocab = build_task(task_options(cfg.task)).tokenizer.vocab_size
        assert cfg.model.resolve().vocab_size == vocab and cfg.routing.mode == "R3"


def test_slurm_30b_override_fits_one_trainer_node(monkeypatch):
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(REPO / "configs/qwen3_30b_a3b_sapo.yaml",
                      ["parallel.expert_model_parallel_size=8", "rollout.sglang.urls=[http://node002:30000]"])
    assert validate_for_world(cfg, 8).expert_data_parallel_size == 1


# --------------------------------------------------------------------------- one-line refusals


@pytest.mark.parametrize("overrides, expected", [
    (["loss.tua_pos=1"], "unknown key 'loss.tua_pos'; did you mean 'loss.tau_pos'? (valid keys under loss: "),
    (["optim.lr=fast"], "optim.lr: expected a number, got 'fast'"),
    (["run.log_every=1"], "unknown key 'run.log_every'"),  # deleted: nothing read it
    (["model.hidden_sise=32"], "unknown key 'model.hidden_sise'; did you mean 'model.hidden_size'?"),
    (["model.hidden_size=big"], "model.hidden_size: expected an integer, got 'big'"),
    (["model.mlp_only_layers=[0,x]"], "model.mlp_only_layers[1]: expected an integer, got 'x'"),
    (["rollout.stop_token_ids=[1,a]"], "rollout.stop_token_ids: expected a list of integers, got '[1,a]'"),
    (["model.megatron.recompute_num_layers=abc"],
     "model.megatron.recompute_num_layers: expected an integer or null (TransformerConfig.recompute_num_layers), got 'abc'"),
    (["optim.megatron.use_distributed_optimizer=maybe"],
     "optim.megatron.use_distributed_optimizer: expected true or false (OptimizerConfig.use_distributed_optimizer), got 'maybe'"),
    (["optim.megatron.use_distributed_optimzer=true"],
     "unknown key 'optim.megatron.use_distributed_optimzer'; did you mean 'optim.megatron.use_distributed_optimizer'"),
    (["rollout.sglang.timeout_s=soon"], "rollout.sglang.timeout_s: expected a number, got 'soon'"),
    (["run.timeouts.rollout_s=-5"], "run.timeouts.rollout_s must be a number of seconds > 0, or null (off), got -5.0"),
    (["run.timeouts.rolout_s=60"], "unknown key 'run.timeouts.rolout_s'; did you mean 'run.timeouts.rollout_s'?"),
    (["run=3"], "run: expected a mapping of run settings (RunConfig), got '3'"),
])
def test_one_line_errors_name_the_dotted_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith(expected), message


def test_inline_model_fields_checked_in_yaml(tmp_path):
    path = write(tmp_path, {"model": {"preset": "tiny-moe", "num_experst": 8, "rope_theta": "high",
                                      "megatron": {"recompute_granulrity": "full"}}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    typo, wrong_type = err.value.problems  # the pass-through is checked once the rest is right
    assert typo == ("unknown key 'model.num_experst'; did you mean 'model.num_experts' or "
                    "'model.num_experts_per_tok'? (valid keys under model: "
                    + ", ".join(sorted(f.name for f in dataclasses.fields(ModelSection))) + ")")
    assert wrong_type == "model.rope_theta: expected a number, got 'high'"
    path = write(tmp_path, {"model": {"megatron": {"recompute_granulrity": "full"}}})
    with pytest.raises(ConfigError, match=r"^unknown key 'model.megatron.recompute_granulrity'; did you mean "
                                          r"'model.megatron.recompute_granularity' or .*\? \(not one of the \d+ "
                                          r"TransformerConfig fields accepted under model.megatron\)$"):
        load_config(path)
    # Every ModelConfig field is accepted inline, and a megatron value of the right type passes.
    cfg = load_config(write(tmp_path, {"model": {"num_experts": 8, "megatron": {"recompute_num_layers": 2,
                                                                                "recompute_granularity": "full",
                                                                                "recompute_method": "block"}}}))
    assert cfg.model.resolve().num_experts == 8 and cfg.model.resolve().megatron["recompute_num_layers"] == 2


def test_post_init_checks_run_through_to_object():
    from omegaconf import OmegaConf

    from sapo_megatron.config.io import _train_schema

    # Guard: a merge alone type-checks but accepts these out-of-range values ...
    bad = {"run": {"steps": 0}, "optim": {"lr": -1.0}, "parallel": {"context_parallel_size": 0}}
    merged = OmegaConf.merge(_train_schema(), bad)
    assert merged.run.steps == 0
    # ... to_object runs each section's __post_init__, and every section's problem is reported.
    with pytest.raises(ConfigError) as err:
        config_from_dict(bad)
    assert err.value.problems == [
        "run.steps must be >= 1, got 0",
        "parallel.context_parallel_size must be a positive integer, got 0",
        "optim.lr must be > 0, got -1.0",  # sections in schema order
    ]


def test_redaction_keeps_env_references():
    assert redact({"hf_token": "${oc.env:HF_TOKEN}"}) == {"hf_token": "${oc.env:HF_TOKEN}"}
    # A default could be the secret itself: redacted like any other value of a secret key.
    assert redact({"hf_token": "${oc.env:HF_TOKEN,hf_abc}"}) == {"hf_token": "<redacted>"}
    assert redact({"path": "${oc.env:DATA}/x"}) == {"path": "${oc.env:DATA}/x"}


@pytest.mark.parametrize("name", ["qwen3_30b_a3b_sapo.yaml", "qwen3_235b_a22b_sapo.yaml"])
def test_shipped_configs_need_their_env(name, monkeypatch):
    for key in (*ENV, "SAPO_SHARED_DIR"):
        monkeypatch.delenv(key, raising=False)
    _, overrides = SHIPPED[name]
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / name, overrides)
    missing = sorted(k for k in ENV if k.split("_")[1] in name.upper() or k == "DAPO_MATH_PATH")
    text = str(err.value)
    for key in missing:  # every unset variable named, with the key that needs it
        assert f"environment variable {key} is not set" in text
    assert "model.hf_dir: environment variable" in text and "task.path: environment variable" in text
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(REPO / "configs" / name, overrides)
    if "235b" in name:  # an optional variable with a default in the file
        assert cfg.rollout.sglang.weight_dir == "runs/qwen3-235b-a22b-sapo/weights"
        monkeypatch.setenv("SAPO_SHARED_DIR", "/shared/run")
        assert load_config(REPO / "configs" / name, overrides).rollout.sglang.weight_dir == "/shared/run/weights"
    saved = to_saved_dict(cfg)
    assert saved["model"]["hf_dir"].startswith("${oc.env:") and saved["task"]["path"] == "${oc.env:DAPO_MATH_PATH}"


# --------------------------------------------------------------------------- config show | validate


def test_config_validate_command(capsys):
    tiny = str(TINY)
    assert run_config_command(["validate", "--config", tiny, "--world-size", "2", "loss.tau_neg=1.1"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("OK: ") and "\n" not in out and "data_parallel_size=1" in out
    assert run_config_command(["validate", "--config", tiny, "loss.tua_pos=1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "unknown key 'loss.tua_pos'; did you mean 'loss.tau_pos'?" in captured.err
    # The world size is checked only when given: TP=2 does not divide 3 ranks.
    assert run_config_command(["validate", "--config", tiny, "--world-size", "3"]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err
    assert run_config_command(["validate", "--config", tiny]) == 0
    capsys.readouterr()
    assert run_config_command(["frobnicate"]) == 2 and "expected show or validate" in capsys.readouterr().err
    assert run_config_command(["validate", "--help"]) == 0
    assert "--world-size" in capsys.readouterr().out


def test_config_show_command(capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-" + "A" * 24)
    argv = ["show", "--config", str(TINY), "--world-size", "2",
            "seed=7", "task.options.api_key=${oc.env:MY_KEY}", "task.options.note=sk-" + "B" * 24]
    assert run_config_command(argv) == 0
    out = capsys.readouterr().out
    body, plan = out.rsplit("# batch plan: ", 1)
    data = yaml.safe_load(body)
    assert data["run"]["seed"] == 7 and data["model"]["num_experts"] == 4  # model resolved
    assert data["task"]["options"] == {"api_key": "${oc.env:MY_KEY}", "note": "<redacted>"}
    assert "A" * 24 not in out and "B" * 24 not in out
    assert plan.startswith("BatchPlan(world_size=2")
    # python -m sapo_megatron.config: the same backend (no action given: show, as before).
    from sapo_megatron.config.__main__ import main

    assert main(["--config", str(TINY)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["steps"] == 200
