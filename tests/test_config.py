"""Configuration: YAML + flags precedence, --help, and one test per validation rule's message."""
import pytest

from megalatent.config import ConfigError
from megalatent.families import build_parser, parse_args, validate

from launcher import launch


def errors_of(argv, world=1):
    cfg = parse_args(argv)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world)
    return "\n".join(info.value.errors)


def test_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hidden-size: 256\nnum_layers: 3\nlr: 1.0e-3\nswiglu: false\n")
    cfg = parse_args(["--config", str(path), "--num-layers", "5", "--swiglu"])
    assert cfg.model.hidden_size == 256  # from the file
    assert cfg.model.num_layers == 5  # the flag wins
    assert cfg.training.lr == 1e-3
    assert cfg.model.swiglu is True
    validate(cfg)


def test_defaults_validate_and_examples_parse(tmp_path):
    import glob

    import torch

    from megalatent.models.sigma_vae import SigmaVAE, SigmaVAEConfig, save_tokenizer
    validate(parse_args([]))
    # LatentLM configs name the σ-VAE tokenizer on the command line: one of the tiny config's shape.
    vae = SigmaVAE(SigmaVAEConfig(image_size=16, patch_size=4, latent_dim=8, hidden_size=16, num_layers=1))
    vae.set_latent_stats(torch.zeros(8), torch.ones(8), 1)
    save_tokenizer(vae, str(tmp_path / "vae"))
    # ... and the documents config its data: one captioned image, made with that tokenizer.
    from megalatent.data.interleaved import write_interleaved
    from megalatent.data.tokenizer import Tokenizer, train_sentencepiece
    text = Tokenizer.load(train_sentencepiece(["a handwritten seven."] * 50, str(tmp_path / "text"), 300))
    docs = write_interleaved([["a handwritten seven.", torch.zeros(1, 16, 16)]], str(tmp_path / "docs"), text,
                             str(tmp_path / "vae"), seed=0)
    examples = sorted(glob.glob("examples/**/*.yaml", recursive=True))
    assert examples, "no example configs found"
    for path in examples:
        extra = ["--latent-tokenizer", str(tmp_path / "vae")] if "latentlm" in path else []
        if "latentlm-docs" in path:
            extra += ["--data-path", docs.data_prefix, "--tokenizer-model", text.model_path]
        # A cluster config may fix a parallel layout (e.g. 8 expert-parallel ranks): it must be valid at some
        # power-of-two world size; the error shown is that of one process.
        errors = None
        for world_size in [2 ** i for i in range(9)]:
            try:
                validate(parse_args(["--config", path] + extra), world_size=world_size)
                break
            except ConfigError as e:
                errors = errors or e
        else:
            raise errors


def test_help_lists_every_flag_with_default():
    out = launch(["-m", "megalatent.pretrain", "--help"])
    assert out.returncode == 0, out.stderr
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help",):
                assert flag in out.stdout, flag
    assert "--tensorboard-dir" in out.stdout and "(default: 3e-05)" in out.stdout


def test_yaml_unknown_key_and_bad_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hiden-size: 12\n")
    with pytest.raises(ConfigError, match="unknown key 'hiden-size' \\(did you mean 'hidden-size'\\?\\)"):
        parse_args(["--config", str(path)])
    path.write_text("hidden-size: wide\n")
    with pytest.raises(ConfigError, match="'hidden_size' must be int, got 'wide'"):
        parse_args(["--config", str(path)])
    path.write_text("swiglu: maybe\n")
    with pytest.raises(ConfigError, match="'swiglu' must be true or false"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="file .*missing.yaml does not exist"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse_args(["--config", str(path)])


RULES = [
    (["--model-family", "nope"], "--model-family 'nope' is unknown"),
    (["--num-layers", "0"], "--num-layers must be >= 1"),
    (["--hidden-size", "0"], "--hidden-size must be >= 1"),
    (["--num-attention-heads", "0"], "--num-attention-heads must be >= 1"),
    (["--seq-length", "0"], "--seq-length must be >= 1"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1"),
    (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size 100 must be divisible by --num-attention-heads 3"),
    (["--hidden-size", "12", "--num-attention-heads", "4"], "rotary embeddings need an even head size"),
    (["--group-query-attention"], "--group-query-attention needs --num-query-groups >= 1"),
    (["--group-query-attention", "--num-query-groups", "3"], "--num-attention-heads 4 must be divisible by --num-query-groups 3"),
    (["--num-query-groups", "2"], "--num-query-groups is set but --group-query-attention is not"),
    (["--ffn-hidden-size", "0"], "--ffn-hidden-size must be >= 1"),
    (["--seq-length", "512", "--max-position-embeddings", "256"], "--seq-length 512 exceeds --max-position-embeddings 256"),
    (["--vocab-size", "1"], "--vocab-size must be >= 2"),
    (["--norm-epsilon", "0"], "--norm-epsilon must be > 0"),
    (["--data-path", "x"], "--data-path needs --tokenizer-model"),
    (["--tokenizer-model", "/nonexistent.model"], "--tokenizer-model: /nonexistent.model does not exist"),
    (["--split", "a,b"], "--split 'a,b' must be up to three non-negative numbers"),
    (["--split", "0,5,5"], "--split '0,5,5' must be up to three non-negative numbers"),
    (["--default-corpus-vocab-size", "100"], "--default-corpus-vocab-size must be >= 512"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1"),
    (["--train-iters", "0"], "--train-iters must be >= 1"),
    (["--micro-batch-size", "3", "--global-batch-size", "16"], "--global-batch-size 16 must be a multiple of --micro-batch-size 3 x data-parallel size 1"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 must be between 0 and --lr 0.0001"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters must be >= 0"),
    (["--lr-warmup-fraction", "2"], "--lr-warmup-fraction must be in [0, 1]"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], "give either --lr-warmup-iters or --lr-warmup-fraction"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters must be >= 1"),
    (["--lr-warmup-iters", "200", "--train-iters", "100"], "warmup (200 steps) is longer than the decay"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "500"], "--lr-wsd-decay-iters 500 must be in (0, 100]"),
    (["--adam-beta2", "1.0"], "--adam-beta1/--adam-beta2 must be in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--clip-grad", "-1"], "--clip-grad must be >= 0"),
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be > 0"),
    (["--eval-iters", "0"], "--eval-interval must be >= 0 and --eval-iters >= 1"),
    (["--save-interval", "0", "--save", "x"], "--save-interval must be >= 1"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
]


@pytest.mark.parametrize("argv,message", RULES, ids=[m[:40] for _, m in RULES])
def test_each_rule_has_a_clear_message(argv, message):
    assert message in errors_of(argv)


def test_batch_rule_counts_data_parallel_ranks():
    assert "x data-parallel size 4" in errors_of(["--micro-batch-size", "4", "--global-batch-size", "8"], world=4)
    # tensor-parallel ranks do not count as data-parallel ones
    validate(parse_args(["--micro-batch-size", "4", "--global-batch-size", "8", "--tensor-model-parallel-size", "4"]),
             world_size=8)


LAYOUT_RULES = [
    (["--tensor-model-parallel-size", "0"], 2, "--tensor-model-parallel-size must be >= 1"),
    (["--tensor-model-parallel-size", "4"], 6, "the world size 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "8", "--num-attention-heads", "4"], 8,
     "--num-attention-heads 4 must be divisible by --tensor-model-parallel-size 8"),
    (["--tensor-model-parallel-size", "4", "--make-vocab-size-divisible-by", "2"], 4,
     "--make-vocab-size-divisible-by 2 must be divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "4", "--ffn-hidden-size", "30"], 4,
     "--ffn-hidden-size 30 must be divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "4", "--group-query-attention", "--num-query-groups", "2"], 4,
     "--num-query-groups 2 must be divisible by --tensor-model-parallel-size 4"),
    (["--sequence-parallel"], 2, "--sequence-parallel needs --tensor-model-parallel-size > 1"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "255"], 2,
     "--sequence-parallel: the tokens per context-parallel rank (--seq-length 255 / 1) must be divisible"),
    (["--context-parallel-size", "0"], 2, "--context-parallel-size must be >= 1"),
    (["--context-parallel-size", "2", "--seq-length", "250"], 2,
     "--context-parallel-size 2: --seq-length 250 must be divisible by 2 x 2"),
    (["--context-parallel-size", "4", "--tensor-model-parallel-size", "2"], 12,
     "the world size 12 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 x "
     "--context-parallel-size 4"),
]


@pytest.mark.parametrize("argv,world,message", LAYOUT_RULES, ids=[m[:40] for _, _, m in LAYOUT_RULES])
def test_impossible_layouts_are_refused(argv, world, message):
    assert message in errors_of(argv + ["--global-batch-size", "64", "--micro-batch-size", "1"], world=world)


def test_all_broken_rules_reported_at_once():
    text = errors_of(["--num-layers", "0", "--lr", "0", "--log-interval", "0"])
    assert "--num-layers" in text and "--lr must be" in text and "--log-interval" in text


def test_bad_data_path_is_reported_before_anything_runs(tmp_path):
    tok = tmp_path / "t.model"
    tok.write_text("x")
    text = errors_of(["--data-path", str(tmp_path / "nothing"), "--tokenizer-model", str(tok)])
    assert "nothing.bin" in text or "nothing.idx" in text


def test_trainer_exits_2_with_the_message(tmp_path):
    out = launch(["-m", "megalatent.pretrain", "--num-layers", "0"], timeout=120)
    assert out.returncode == 2
    assert "--num-layers must be >= 1" in out.stderr


PP = ["--pipeline-model-parallel-size", "2", "--untie-embeddings-and-output-weights", "--num-layers", "4",
      "--global-batch-size", "8", "--micro-batch-size", "1"]
PIPELINE_RULES = [
    (["--pipeline-model-parallel-size", "0"], 2, "--pipeline-model-parallel-size must be >= 1"),
    (PP + ["--tensor-model-parallel-size", "2"], 6,
     "the world size 6 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1,
     "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1"),
    (["--pipeline-schedule", "ZBVZeroBubble"], 1, "--pipeline-schedule needs --pipeline-model-parallel-size > 1"),
    (PP + ["--num-layers", "3"], 2, "--num-layers 3 must be divisible by --pipeline-model-parallel-size 2"),
    (PP + ["--num-layers-per-virtual-pipeline-stage", "4"], 2,
     "--num-layers-per-virtual-pipeline-stage 4: --num-layers 4 must split into virtual stages"),
    (PP + ["--decoder-first-pipeline-num-layers", "5"], 2, "leave -1 of --num-layers 4 for the 1 other stage(s)"),
    (PP + ["--num-layers-per-virtual-pipeline-stage", "1", "--decoder-last-pipeline-num-layers", "1"], 2,
     "cannot be combined with --decoder-first/last-pipeline-num-layers"),
    (PP + ["--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-schedule", "1F1B"], 2,
     "--pipeline-schedule 1F1B runs one stage per rank"),
    (PP + ["--pipeline-schedule", "Interleaved1F1B"], 2, "--pipeline-schedule Interleaved1F1B needs several stages"),
    (PP + ["--num-layers", "6", "--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-schedule",
           "ZBVZeroBubble"], 2, "--pipeline-schedule ZBVZeroBubble needs exactly 2 stages per rank"),
    (PP + ["--global-batch-size", "1"], 2, "1F1B over 2 pipeline stages needs a number of micro-batches per step"),
    (PP + ["--global-batch-size", "3", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
     "Interleaved1F1B over 2 pipeline stages needs a number of micro-batches per step"),
]


@pytest.mark.parametrize("argv,world,message", PIPELINE_RULES, ids=[m[:40] for _, _, m in PIPELINE_RULES])
def test_impossible_pipelines_are_refused(argv, world, message):
    assert message in errors_of(argv, world=world)


def test_valid_pipelines_plan_their_stages():
    from megalatent.distributed.pipeline import plan_pipeline
    plan = plan_pipeline(parse_args(PP + ["--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2"]), 2)
    assert plan.schedule == "Interleaved1F1B" and plan.stage_layers == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan.stages_of_rank(0) == [0, 2] and plan.stages_of_rank(1) == [1, 3]
    zbv = plan_pipeline(parse_args(PP + ["--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-schedule",
                                         "ZBVZeroBubble"]), 2)
    assert zbv.stages_of_rank(0) == [0, 3] and zbv.stages_of_rank(1) == [1, 2]
    uneven = plan_pipeline(parse_args(PP + ["--num-layers", "7", "--pipeline-model-parallel-size", "3",
                                            "--decoder-first-pipeline-num-layers", "1",
                                            "--decoder-last-pipeline-num-layers", "2"]), 3)
    assert uneven.stage_layers == [[0], [1, 2, 3, 4], [5, 6]]


LONGNET = ["--model-family", "longnet"]
LONGNET_RULES = [
    (LONGNET, 1, "--model-family longnet needs --segment-lengths and --dilated-ratios"),
    (LONGNET + ["--segment-lengths", "64", "128", "--dilated-ratios", "1"], 1,
     "--segment-lengths has 2 values and --dilated-ratios 1"),
    (LONGNET + ["--segment-lengths", "0", "128", "--dilated-ratios", "1", "2"], 1,
     "--segment-lengths and --dilated-ratios must be >= 1"),
    (LONGNET + ["--segment-lengths", "128", "64", "--dilated-ratios", "1", "2"], 1,
     "LongNet's patterns are geometric"),
    (LONGNET + ["--segment-lengths", "48", "128", "--dilated-ratios", "1", "2", "--context-parallel-size", "2",
                "--seq-length", "256"], 2,
     "--context-parallel-size 2: each rank holds 128 tokens; a segment length must divide that or be a multiple"),
    (["--segment-lengths", "64"], 1,
     "--segment-lengths configures --model-family longnet, longvit, not gpt: drop it, or choose --model-family longnet"),
]


@pytest.mark.parametrize("argv,world,message", LONGNET_RULES, ids=[m[:40] for _, _, m in LONGNET_RULES])
def test_longnet_rules(argv, world, message):
    assert message in errors_of(argv, world=world)


def test_yaml_lists_of_integers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model-family: longnet\nsegment-lengths: [64, 128]\ndilated-ratios: 1 2\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.model.segment_lengths == [64, 128] and cfg.model.dilated_ratios == [1, 2]
    validate(cfg)
    path.write_text("segment-lengths: [64, wide]\n")
    with pytest.raises(ConfigError, match="'segment_lengths' must be a list of int"):
        parse_args(["--config", str(path)])


def test_a_flag_of_another_family_is_refused_naming_its_family(tmp_path):
    """Each family's flags are its own section: given to another family, from the command line or a YAML
    file, they are reported with the other broken rules, naming the family they configure."""
    assert "--yoco-self-attention configures --model-family yoco, not longnet" in errors_of(
        ["--model-family", "longnet", "--segment-lengths", "64", "--dilated-ratios", "1", "--yoco-self-attention",
         "swa"])
    path = tmp_path / "c.yaml"
    path.write_text("model-family: gpt\nlatent-dim: 16\nnum-layers: 0\n")
    text = errors_of(["--config", str(path)])
    assert "--latent-dim configures --model-family latentlm, not gpt" in text and "--num-layers must be >= 1" in text
    cfg = parse_args(["--model-family", "longvit", "--segment-lengths", "64", "--dilated-ratios", "1"])
    assert cfg.model.segment_lengths == [64] and not hasattr(parse_args([]).model, "segment_lengths")


def test_help_groups_flags_by_family():
    """--help lists the shared model flags, the MoE flags, then each family's own section."""
    text = build_parser().format_help()
    sections = ["\nmodel:", "\nmoe:", "\n--model-family longnet:", "\n--model-family yoco:",
                "\n--model-family latentlm:", "\n--model-family longvit:", "\ndata:"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    yoco = text[text.index("--model-family yoco:"):text.index("--model-family latentlm:")]
    assert "--sliding-window-size" in yoco and "--segment-lengths" not in yoco
    assert "--segment-lengths" in text[text.index("--model-family longnet:"):text.index("--model-family yoco:")]
