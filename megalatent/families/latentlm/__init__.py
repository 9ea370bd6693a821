"""LatentLM (arXiv 2412.08635): next-token diffusion over text and σ-VAE latents (megalatent/models/latentlm.py).

Objective: cross-entropy where the next token is discrete plus the (weighted) diffusion loss where it is a
latent; the step's loss is the mean over both kinds of predictions, and the log shows each part's own mean
too. The diffusion loss's timesteps and noises come with the data (data/latent_data.DiffusionDraws), so
every layout draws the same ones.

Parallelism: the trunk's plan; the latent projection and the diffusion head stay whole on every
tensor-parallel rank (they see the same hidden states there, so their gradients agree without
communication). Under sequence parallelism the token embeddings are all-reduced whole (not
reduce-scattered), the latents put in place, and only then the sequence scattered; the final norm's output
is gathered once, for the output layer and the diffusion head. Under pipeline parallelism the projection
lives on the first stage and the head on the last; under context parallelism (zigzag) each rank's head
takes its own positions.

    images.py   prompts and sampling from a trained checkpoint (tools/generate.py, tools/eval_digits.py)
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput, RowwiseParallel, SequenceParallel

from megalatent.config import Config
from megalatent.data import interleaved, latent_data
from megalatent.distributed.plan import ParallelPlan, PipelineSplit
from megalatent.distributed.tensor_parallel import apply_tensor_parallel, sequence_layout
from megalatent.families.family import Family, FamilyData
from megalatent.models.latentlm import LatentLM, LatentLMConfig, flops_per_token
from megalatent.training.objectives import Objective, lm_loss_sum, pack_targets, shard_tokens


def _pipeline_loss(stage: nn.Module, out, packed: torch.Tensor) -> torch.Tensor:
    """The last stage returns (logits, normed hidden states); its diffusion head turns them into the loss."""
    mul, k = stage.cfg.diffusion_batch_mul, stage.cfg.latent_dim
    labels, loss_mask, diffusion_mask, t, target, noise = packed.split([1, 1, 1, mul, k, mul * k], dim=-1)
    return torch.stack([lm_loss_sum(out[0], labels[..., 0].long(), loss_mask[..., 0]),
                        stage.diffusion_loss(out[1], target, diffusion_mask[..., 0], t.long(),
                                             noise.unflatten(-1, (mul, k)))])


LATENT_LM = Objective(
    batch_keys={"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
                "position_ids": torch.int64, "latents": torch.float32, "latent_mask": torch.bool,
                "target_latents": torch.float32, "diffusion_mask": torch.float32,
                "diffusion_t": torch.int64, "diffusion_noise": torch.float32},
    forward=lambda model, b: model(b["tokens"], b["position_ids"], b["latents"], b["latent_mask"],
                                   b["target_latents"], b["diffusion_mask"], b["diffusion_t"], b["diffusion_noise"]),
    loss_sum=lambda out, b: torch.stack([lm_loss_sum(out[0], b["labels"], b["loss_mask"]), out[1]]),
    count=lambda b: b["loss_mask"].sum() + b["diffusion_mask"].sum(),
    shard=shard_tokens,
    pipeline_inputs=lambda b: (b["tokens"], b["position_ids"], b["latents"], b["latent_mask"]),
    pipeline_targets=lambda b: pack_targets(b["labels"], b["loss_mask"], b["diffusion_mask"], b["diffusion_t"],
                                            b["target_latents"], b["diffusion_noise"].flatten(2)),
    pipeline_loss=_pipeline_loss,
    loss_parts=("cross-entropy", "diffusion"),
    part_counts=lambda b: torch.stack([b["loss_mask"].sum(), b["diffusion_mask"].sum()]),
)


class GatheredSequenceParallel(SequenceParallel):
    """SequenceParallel (the module runs on this rank's tokens) whose output is gathered back to the whole
    sequence as a plain tensor: the final norm, whose output feeds both the output layer and the head."""

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        return outputs.redistribute(placements=[Replicate()]).to_local()


def tensor_parallel(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    plan = {}
    if sequence_parallel and model.embed_tokens is not None:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["latent_in"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=sequence_layout(True),
                                                use_local_output=True)
    if sequence_parallel and model.output is not None:
        plan["norm"] = GatheredSequenceParallel()
        plan["output"] = PrepareModuleInput(input_layouts=(Replicate(), None), desired_input_layouts=(Replicate(), None),
                                            use_local_output=False)
    apply_tensor_parallel(model, mesh, sequence_parallel, plan)


def validate(cfg: Config) -> list[str]:
    m, d = cfg.model, cfg.data
    e = []
    if m.diffusion_batch_mul < 1 or m.diffusion_head_layers < 1:
        e.append("--diffusion-batch-mul and --diffusion-head-layers must be >= 1")
    if m.latent_tokenizer is None:
        return e + ["--model-family latentlm needs --latent-tokenizer DIR (train one: python tools/train_vae.py "
                    "--save DIR)"]
    if not os.path.isfile(os.path.join(m.latent_tokenizer, "config.json")):
        return e + [f"--latent-tokenizer {m.latent_tokenizer} is not a σ-VAE tokenizer directory (no config.json); "
                    "train one with python tools/train_vae.py --save DIR"]
    from megalatent.models.sigma_vae import load_tokenizer, read_tokenizer_config
    try:
        vae = read_tokenizer_config(m.latent_tokenizer)["config"]
        load_tokenizer(m.latent_tokenizer)  # its weights and latent statistics open too (a small model)
    except (ValueError, OSError, RuntimeError) as err:  # RuntimeError: torch's for a damaged weights file
        return e + [f"--latent-tokenizer {m.latent_tokenizer}: unreadable ({str(err).splitlines()[0]})"]
    if m.latent_dim != vae["latent_dim"]:
        e.append(f"--latent-dim {m.latent_dim} differs from the tokenizer's latent_dim {vae['latent_dim']}")
    if d.data_path is not None:
        return e + _document_errors(cfg)
    tokens = (vae["image_size"] // vae["patch_size"]) ** 2
    if m.seq_length != latent_data.sequence_length(tokens):
        e.append(f"--seq-length must be {latent_data.sequence_length(tokens)} for this tokenizer "
                 f"({tokens} latents per image + class, <boi>, <eoi>), got {m.seq_length}")
    if m.vocab_size is not None and m.vocab_size < latent_data.vocab_size(m.num_classes):
        e.append(f"--vocab-size {m.vocab_size} is too small for {m.num_classes} classes and 4 special tokens")
    if not 0 <= m.class_dropout < 1:
        e.append(f"--class-dropout must be in [0, 1), got {m.class_dropout}")
    return e


def _document_errors(cfg: Config) -> list[str]:
    """--data-path: interleaved text+image documents (tools/preprocess_interleaved.py), whose latent stores
    must have been made with this run's tokenizers."""
    from megalatent.data.gpt_data import parse_data_path
    from megalatent.data.interleaved import open_latent_stores
    from megalatent.data.tokenizer import Tokenizer

    d = cfg.data
    if d.tokenizer_model is None:
        return ["--data-path needs --tokenizer-model (the text tokenizer the documents were made with; "
                "tools/preprocess_interleaved.py prints the training flags)"]
    if not os.path.isfile(d.tokenizer_model):
        return []  # the shared rules report the missing file
    try:
        prefixes, _ = parse_data_path(d.data_path)
        open_latent_stores(prefixes, cfg.model.latent_tokenizer, Tokenizer.load(d.tokenizer_model))
    except (ValueError, FileNotFoundError) as err:
        return [str(err)]
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab_size(cfg):
        return [f"--vocab-size {cfg.model.vocab_size} is too small for the text tokenizer's ids and <boi>, <eoi> "
                f"and the latent placeholder ({vocab_size(cfg)}); leave it out"]
    return []


def vocab_size(cfg: Config) -> int:
    """Class-conditional: the classes, the null class and 3 special ids; on documents: the text tokenizer's
    ids and 3 special ids."""
    if cfg.data.data_path is None:
        return latent_data.vocab_size(cfg.model.num_classes)
    from megalatent.data.tokenizer import Tokenizer
    return interleaved.vocab_size(Tokenizer.load(cfg.data.tokenizer_model).vocab_size)


FAMILY = Family(name="latentlm", config=LatentLMConfig, build=LatentLM, flops_per_token=flops_per_token,
                validate=validate, objective=LATENT_LM,
                parallel=ParallelPlan(tensor_parallel=tensor_parallel,
                                      pipeline=PipelineSplit(first=("embed_tokens", "latent_in"),
                                                             last=("norm", "output", "diffusion_head"))),
                data=FamilyData(build=latent_data.build_latent_loaders, vocab_size=vocab_size))
