"""LatentLM (models.md §5): sequences of class, <boi>, σ-VAE latents, <eoi>; cross-entropy on the discrete
positions, the diffusion loss on the continuous ones; a training step with TP=2 equals one process; the
diffusion gradient reaches the Transformer; class-conditional sampling returns latents the tokenizer decodes."""
import pytest
import torch

from megalatent.config import ConfigError, parse_args, validate
from megalatent.data.latent_data import ClassConditionalLatents, special_tokens
from megalatent.models.registry import build_model
from megalatent.models.sigma_vae import SigmaVAE, SigmaVAEConfig, save_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """An (untrained) σ-VAE tokenizer of 8 x 8 images: 4 latents of width 4."""
    vae = SigmaVAE(SigmaVAEConfig(image_size=8, patch_size=4, latent_dim=4, hidden_size=16, num_layers=1))
    vae.set_latent_stats(torch.zeros(4), torch.ones(4), 1)
    path = str(tmp_path_factory.mktemp("vae") / "tok")
    save_tokenizer(vae, path)
    return path


def latent_flags(tokenizer_dir):
    return {"model-family": "latentlm", "latent-tokenizer": tokenizer_dir, "latent-dim": 4, "seq-length": 7,
            "num-classes": 10, "diffusion-head-layers": 2}


def test_sequence_layout():
    z = torch.randn(1, 3, 2)
    sample = ClassConditionalLatents(z, torch.tensor([7]), 10, 0.0, seed=0)[0]
    ids = special_tokens(10)
    assert sample["tokens"].tolist() == [7, ids["boi"], ids["latent"], ids["latent"], ids["latent"], ids["eoi"]]
    assert sample["latent_mask"].tolist() == [False, False, True, True, True, False]
    torch.testing.assert_close(sample["latents"][2:5], z[0])
    torch.testing.assert_close(sample["target_latents"][1:4], z[0])  # position i predicts the latent at i + 1
    assert sample["diffusion_mask"].tolist() == [0, 1, 1, 1, 0, 0]
    assert sample["loss_mask"].tolist() == [1, 0, 0, 0, 1, 0]
    assert sample["labels"][0] == ids["boi"] and sample["labels"][4] == ids["eoi"]


def test_diffusion_gradient_reaches_the_transformer_and_sampling_runs(tokenizer_dir):
    argv = [f"--{k}={v}" for k, v in latent_flags(tokenizer_dir).items()] + ["--vocab-size", "16",
                                                                               "--make-vocab-size-divisible-by", "8"]
    cfg = parse_args(argv)
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    batch = ClassConditionalLatents(torch.randn(2, 4, 4), torch.tensor([1, 2]), 10, 0.0, seed=0)
    b = {k: torch.stack([batch[i][k] for i in range(2)]) for k in batch[0]}
    for p in model.diffusion_head.parameters():  # leave the zero-initialised gates: the head must pass gradient
        torch.nn.init.normal_(p, std=0.1)
    logits, diffusion = model(b["tokens"], b["position_ids"], b["latents"], b["latent_mask"], b["target_latents"],
                              b["diffusion_mask"])
    diffusion.backward()
    assert logits.shape == (2, 7, 16) and diffusion.item() > 0
    assert model.layers["0"].attention.q_proj.weight.grad.abs().sum() > 0  # through the condition, into the trunk
    z = model.sample_latents(torch.tensor([3, 4]), num_latents=4, steps=3, cfg_scale=2.0)
    assert z.shape == (2, 4, 4) and torch.isfinite(z).all()


def test_config_errors(tokenizer_dir):
    flags = latent_flags(tokenizer_dir)
    with pytest.raises(ConfigError, match="--seq-length must be 7"):
        validate(parse_args([f"--{k}={v}" for k, v in {**flags, "seq-length": 9}.items()]))
    with pytest.raises(ConfigError, match="needs --latent-tokenizer"):
        validate(parse_args(["--model-family", "latentlm"]))


def test_tp2_and_pp2_steps_equal_one_process(tmp_path, tokenizer_dir):
    """Three optimizer steps at TP=2 and at PP=2 (1F1B: the latent projection on the first stage, the
    diffusion head on the last) against one process. The diffusion noise draws are the same: every run has
    one data-parallel rank, and the loss's draws happen in micro-batch order on the rank holding the head."""
    from test_parallel import run_worker
    flags = latent_flags(tokenizer_dir)
    untied = {**flags, "untie-embeddings-and-output-weights": True}
    references = run_worker(tmp_path, 1, [flags, untied], "latent_ref")
    results = run_worker(tmp_path, 2, [{**flags, "tensor-model-parallel-size": 2},
                                       {**untied, "pipeline-model-parallel-size": 2}], "latent_two")
    for label, result, reference in zip(("TP=2", "PP=2"), results, references):
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5), label
        assert result["grads"].keys() == reference["grads"].keys(), label
        for name, g in reference["grads"].items():  # float32 sums in another order: relative to the tensor's scale
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(),
                                       msg=f"{label} {name}")
        for name, w in reference["weights"].items():
            torch.testing.assert_close(result["weights"][name], w, rtol=1e-4, atol=1e-5, msg=f"{label} {name}")


def test_train_then_sample_images_with_generate_tool(corpus_cache, tmp_path, tokenizer_dir):
    """The trainer on the embedded digits (through the fixture's tokenizer), then tools/generate.py samples
    class-conditional images from the checkpoint (the tokenizer found through the checkpoint)."""
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO, losses, run_trainer
    save = str(tmp_path / "ckpt")
    out = run_trainer(["--config", "examples/tiny/latentlm.yaml", "--latent-tokenizer", tokenizer_dir,
                       "--latent-dim", "4", "--seq-length", "7", "--train-iters", "3", "--lr-warmup-iters", "1",
                       "--log-interval", "1", "--eval-interval", "0", "--save", save], corpus_cache)
    assert sorted(losses(out.stdout)) == [1, 2, 3]
    png = str(tmp_path / "samples.png")
    gen = subprocess.run([sys.executable, "tools/generate.py", "--load", save, "--classes", "1", "7",
                          "--solver-steps", "3", "--output", png], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert Image.open(png).size == (2 * 8, 8)  # two 8 x 8 digits side by side
