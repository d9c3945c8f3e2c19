import pytest

from lion_ray.config import ConfigError, LionConfig, dump_config, load_config

from .conftest import ROOT


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, LionConfig)


def test_demo_config_uses_sandbox_and_tiny_student():
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.uses_sandbox and cfg.student.model_path == "" and cfg.train.gpus_per_worker == 0


def test_paper_config_matches_the_paper():
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    assert (cfg.loop.rounds, cfg.loop.hard_per_round, cfg.loop.easy_per_round) == (3, 3000, 3000)
    assert cfg.loop.tau == 1.0 and cfg.loop.rouge_threshold == 0.7
    assert cfg.train.lr == 2e-5 and cfg.train.epochs == 3 and cfg.train.effective_batch_size == 128
    assert cfg.teacher.temperature == 0.7 and cfg.referee.temperature == 0.2
    assert cfg.train.grad_accum_steps == 4


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("train:\n  zero_stage: 4\n", r"train\.zero_stage: Input should be 2 or 3 \(got 4\)"),
        ("train:\n  lr: -1\n", r"train\.lr: Input should be greater than 0"),
        ("loop:\n  tau: fast\n", r"loop\.tau: Input should be a valid number"),
        ("trian:\n  lr: 1\n", r"trian: unknown field; check the spelling"),
        (
            "train:\n  micro_batch_size: 3\n  workers: 2\n  effective_batch_size: 128\n",
            r"train: .*effective_batch_size \(128\) must be a multiple of micro_batch_size x workers \(3 x 2 = 6\); try 126",
        ),
        ("train:\n  offload_params: true\n", r"offload_params needs zero_stage: 3"),
        ("teacher:\n  api_key: sk-123\n", r"teacher: .*secrets never go in config files"),
        (
            "teacher:\n  base_url: api.openai.com\n",
            r"teacher\.base_url: .*must be 'sandbox' or an http",
        ),
        ("student:\n  backend: tgi\n", r"student\.backend: Input should be 'hf' or 'vllm'"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(_write(tmp_path, text))


def test_secret_value_never_echoed(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "teacher:\n  api_key: sk-supersecret\n"))
    assert "sk-supersecret" not in str(err.value)


def test_bad_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:3: not valid YAML"):
        load_config(_write(tmp_path, "train:\n  lr: 1\n   bad: [\n"))


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(
        None, ["train.lr=1e-5", "loop.rounds=5", "student.backend=vllm", "cluster.address=null"]
    )
    assert cfg.train.lr == 1e-5 and cfg.loop.rounds == 5 and cfg.student.backend == "vllm"
    with pytest.raises(ConfigError, match=r"loop\.rounds: Input should be greater than 0"):
        load_config(None, ["loop.rounds=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["loop.rounds"])


def test_dump_roundtrips(tmp_path):
    cfg = load_config(ROOT / "configs" / "paper.yaml")
    again = load_config(_write(tmp_path, dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "role, temperature, max_tokens",
    [("teacher", 0.7, 1024), ("referee", 0.2, 512), ("generator", 1.0, 512)],
)
def test_a_role_block_keeps_the_roles_defaults(tmp_path, role, temperature, max_tokens):
    """A user's block overrides only the fields it names (the paper's decoding per role)."""
    cfg = load_config(_write(tmp_path, f"{role}:\n  base_url: https://x.test/v1\n  model: m\n"))
    ep = getattr(cfg, role)
    assert (ep.base_url, ep.model, ep.temperature, ep.max_tokens) == (
        "https://x.test/v1",
        "m",
        temperature,
        max_tokens,
    )
    changed = load_config(_write(tmp_path, f"{role}:\n  temperature: 0.5\n"))
    assert getattr(changed, role).temperature == 0.5
    assert getattr(changed, role).max_tokens == max_tokens
    shown = load_config(None, [f"{role}.model=other"])  # --set too
    assert getattr(shown, role).temperature == temperature


def test_a_reasoning_model_as_referee(tmp_path):
    cfg = load_config(
        _write(
            tmp_path,
            "referee:\n  model: o-mini\n  token_param: max_completion_tokens\n"
            "  temperature: null\n  top_p: null\n  structured_output: true\n",
        )
    )
    assert cfg.referee.temperature is None and cfg.referee.max_tokens == 512
    with pytest.raises(ConfigError, match=r"referee\.mode: Input should be 'online' or 'batch'"):
        load_config(None, ["referee.mode=later"])


@pytest.mark.parametrize(
    "sets, pattern",
    [
        (
            ["serve.backend=vllm"],
            r"serve.gpus_per_replica is 0, but a vLLM replica on GPU needs "
            r"student.tensor_parallel_size \(1\) GPUs: set serve.gpus_per_replica=1",
        ),
        (
            ["serve.backend=vllm", "serve.gpus_per_replica=1", "student.tensor_parallel_size=2"],
            r"needs student.tensor_parallel_size \(2\) GPUs",
        ),
        (
            ["student.backend=vllm", "train.lora.r=1024"],
            r"train.lora.r: LoRA rank 1024 is above the largest vLLM serves \(512\)",
        ),
    ],
)
def test_vllm_settings_that_cannot_start_are_refused(sets, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("demo", sets)


def test_vllm_settings_that_can_start():
    load_config("demo", ["serve.backend=vllm", "student.vllm_device=cpu"])
    load_config(
        "demo",
        ["serve.backend=vllm", "serve.gpus_per_replica=2"] + ["student.tensor_parallel_size=2"],
    )
    load_config("demo", ["student.backend=hf", "train.lora.r=1024"])  # hf serves any rank


def test_lora_ranks_round_up_to_what_vllm_accepts():
    from lion_ray.config import VLLM_LORA_RANKS, vllm_lora_rank
    from lion_ray.errors import LionError

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 33, 300, 321, 512)] == [
        1,
        8,
        8,
        16,
        16,
        64,
        320,
        512,
        512,
    ]
    assert all(vllm_lora_rank(r) in VLLM_LORA_RANKS for r in range(1, 513))
    with pytest.raises(LionError, match="LoRA rank 513 is above the largest vLLM serves"):
        vllm_lora_rank(513)
