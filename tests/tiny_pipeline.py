"""Build a tiny, randomly initialised Stable Diffusion 1.x-style pipeline on disk.

No network access is needed: every component is constructed from a config in code
and the CLIP tokenizer is built from a vocab.json / merges.txt written here.

    from tiny_pipeline import build_tiny_pipeline
    build_tiny_pipeline(pathlib.Path("/tmp/tiny-sd"))
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained("/tmp/tiny-sd")

Layout written (a normal diffusers folder, ~1.2 MB):
    model_index.json  scheduler/  text_encoder/  tokenizer/  unet/  vae/

The VAE has 4 levels, so vae_scale_factor == 8 like real SD: width/height must be
multiples of 8. UNet sample_size 32 -> default output size 256x256 when the caller
passes no width/height.
"""

from __future__ import annotations

import json
import pathlib

SEED = 0

# A few BPE merges so that merges.txt is genuinely exercised; every word still
# tokenises (down to single byte-level characters), so any prompt works.
_MERGES: list[tuple[str, str]] = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("o", "f</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("d", "o"),
    ("do", "g</w>"),
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (same as transformers')."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _write_tokenizer_files(tok_dir: pathlib.Path) -> None:
    """Write a tiny byte-level BPE vocab.json + merges.txt in CLIP's format.

    Vocab: 256 byte chars, the same 256 with the end-of-word suffix "</w>",
    the merge results, then <|startoftext|> and <|endoftext|> last (as in CLIP).
    """
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for a, b in _MERGES:
        if a not in vocab or b not in vocab:  # pragma: no cover - guards edits to _MERGES
            raise ValueError(f"merge {a!r} {b!r} uses a token not in the vocab")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)

    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (tok_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")


def build_tiny_pipeline(path: pathlib.Path) -> None:
    """Write a tiny random StableDiffusionPipeline to ``path`` (created if needed).

    The scheduler is DDIM: with numpy 2 and torch 2.13 the Euler-family schedulers call
    ``np.array(tensor)``, a DeprecationWarning, which the tests turn into an error.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)

    tok_dir = path / "tokenizer"
    _write_tokenizer_files(tok_dir)
    # from_pretrained on a local folder: no hub access. (Works for the slow
    # transformers-4 CLIPTokenizer and the tokenizers-backed transformers-5 one.)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77)

    # The RNG is re-seeded before every component so that each one's weights do
    # not depend on the others' parameter counts.
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # 4 levels -> vae_scale_factor 8, as in real SD 1.x / SDXL.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    ).eval()

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,  # anything else: a FutureWarning when the pipeline loads
            timestep_spacing="trailing",  # as sdxl-turbo: good with few steps
            prediction_type="epsilon",
            clip_sample=False,  # True: a FutureWarning
            set_alpha_to_one=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    # safetensors, float32. Writes tokenizer.json + tokenizer_config.json beside
    # the vocab.json / merges.txt already in tokenizer/.
    pipe.save_pretrained(str(path), safe_serialization=True)
