"""Activation peaks for ``storypipe plan``, traced rather than guessed.

The stages' own modules, built from the same configs as the weight counts, run on *fake* tensors
(``torch._subclasses.FakeTensorMode``: every tensor has its shape, dtype and device but no storage, so
nothing is allocated or computed) while :class:`StoragePeak` follows every storage their ops create from
allocation to release and keeps the peak. What is traced:

| purpose | traced |
|---|---|
| generate | LLaVA: vision tower, a prefill over image and prompt tokens, then the new tokens growing the KV cache; SD: text encoder, VAE encode of the references and blank images, the two reference record passes, the 3-branch UNet pass holding their features, VAE decode |
| finetune-llava | one training step: vision tower (no grad), language model with LoRA and gradient checkpointing under autocast, logits and loss, backward |
| finetune-storygen | one training step of ``StoryDiffusion.forward`` (reference record pass, UNet with context layers, gradient checkpointing, autocast) and backward |

Each figure is what lives beyond the weights, gradients and optimizer states (those are counted in
:mod:`storypipe.plan`): activations and temporaries at the traced peak. Attention runs through PyTorch's
fused SDPA kernels, which never hold the full score matrix; on a GPU that is what the flash and
memory-efficient kernels do. The CUDA caching allocator's fragmentation and the CUDA context (a few
hundred MiB) are not traced.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from llava_ft.config import CaptionerConfig
    from storygen_ft.config import GeneratorConfig

# Text tokens the captioners' prompts take besides the image tokens: the chat template with one or two
# story captions (the description prompt reads two). An upper estimate; VIST captions are ~12 words.
PROMPT_TEXT_TOKENS = 128
# A training sample's text tokens besides the image: the prompt plus the answer (one caption).
TRAIN_TEXT_TOKENS = PROMPT_TEXT_TOKENS + 48
TRACED_DEVICE = "cpu"  # fake tensors need no device; sizes are the same on any


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Tensors made inside are fake: shapes and dtypes only. Real inputs (token ids) are allowed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        yield


def materialise(meta_module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A meta-device module, in place, as fake tensors of ``dtype`` (call inside :func:`fake_tensors`)."""
    from torch import nn
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # the dtype cast is a meta-to-meta swap; fake mode would refuse it
        # torch's own cast: diffusers' ModelMixin.to would warn about fp32-kept modules a plain cast skips,
        # which matters for loading weights, not for tracing shapes.
        nn.Module.to(meta_module, dtype)
    return meta_module.to_empty(device=TRACED_DEVICE)


class StoragePeak:
    """Live bytes of the tensor storages ops create, and their peak: a dispatch mode over the fake mode
    sees every op's outputs; a storage counts from the op that made it until it is freed (a weakref
    callback). Parameters and buffers predate the trace, so they never count; a trainable parameter's
    gradient stops counting once autograd hands it over (the planner lists gradients apart)."""

    def __init__(self, weights: list[torch.Tensor], trainable: list[torch.Tensor]) -> None:
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}  # id(storage) -> bytes, while alive and counted
        self.refs: dict[int, weakref.ref] = {}
        self.weights = {id(tensor.untyped_storage()) for tensor in weights}  # ops return views of them
        self.trainable = trainable

    def track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self.sizes or key in self.weights:
            return
        self.sizes[key] = storage.nbytes()
        self.refs[key] = weakref.ref(storage, lambda _: self.release(key))
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)

    def release(self, key: int) -> None:
        self.live -= self.sizes.pop(key, 0)
        self.refs.pop(key, None)

    def gradient(self, parameter: torch.Tensor) -> None:
        self.release(id(parameter.grad.untyped_storage()))

    @contextlib.contextmanager
    def tracing(self) -> Iterator[StoragePeak]:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for leaf in tree_leaves(out):
                    if isinstance(leaf, torch.Tensor):
                        tracker.track(leaf.untyped_storage())
                return out

        handles = [p.register_post_accumulate_grad_hook(self.gradient) for p in self.trainable]
        try:
            with Mode():
                yield self
        finally:
            for handle in handles:
                handle.remove()


def traced_peak(run: Callable[[], object], *modules: nn.Module) -> int:
    """Peak bytes of activations and temporaries while ``run()`` runs: storages made by its ops, less the
    ``modules``' parameters and buffers and their trainable parameters' gradients (counted with the
    weights). Inputs are activations too: ``run`` makes them."""
    weights = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    trainable = [p for module in modules for p in module.parameters() if p.requires_grad]
    with StoragePeak(weights, trainable).tracing() as tracker:
        run()
    return tracker.peak


# --------------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------------


def image_tokens(llava: nn.Module) -> int:
    """Vision features per image: (image / patch)² patches (the class token is dropped)."""
    vision = llava.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def llava_generate_activations(
    llava_meta: nn.Module,
    cfg: CaptionerConfig,
    dtype: torch.dtype,
    prompt_tokens: int = PROMPT_TEXT_TOKENS,
    batch: int = 1,
) -> int:
    """``batch`` captions at once, as ``generate`` runs them: the vision tower on one image, a prefill over the image and
    ``prompt_tokens`` text tokens that keeps its KV cache, then the new tokens growing the cache. With nf4 weights each Linear is dequantised to ``dtype`` in turn: the largest such
    weight is added."""
    from torch import nn

    vision = llava_meta.config.vision_config
    hidden = llava_meta.config.text_config.hidden_size
    largest_linear = max(m.weight.numel() for m in llava_meta.modules() if isinstance(m, nn.Linear))
    with fake_tensors(), torch.no_grad():
        model = materialise(llava_meta, dtype).eval()
        language_model = model.model.language_model

        def run() -> None:
            pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, dtype=dtype)  # (B, 3, S, S)
            model.model.vision_tower(pixels, output_hidden_states=True)
            prompt = torch.randn(batch, image_tokens(model) + prompt_tokens, hidden, dtype=dtype)  # (B, T, H)
            output = language_model(inputs_embeds=prompt, use_cache=True)
            # The new tokens: all but the last in one chunk (its temporaries are a prompt's fraction), then
            # the last step over the fullest cache. Shape for shape this is generate's peak, 3 calls not 48.
            for new in (cfg.max_new_tokens - 2, 1):
                model.lm_head(output.last_hidden_state[:, -1:])  # generate's logits: the last position only
                if new > 0:
                    chunk = torch.randn(batch, new, hidden, dtype=dtype)  # (B, new, H)
                    output = language_model(
                        inputs_embeds=chunk, past_key_values=output.past_key_values, use_cache=True
                    )

        peak = traced_peak(run, model)
    dequantised = largest_linear * dtype.itemsize if cfg.load_in_4bit else 0
    return peak + dequantised


def llava_train_activations(
    llava_meta: nn.Module,
    cfg: CaptionerConfig,
    dtype: torch.dtype,
    compute: torch.dtype | None,
    text_tokens: int = TRAIN_TEXT_TOKENS,
) -> int:
    """One training step at ``captioner.train.batch_size``: the frozen vision tower, the language model
    with a LoRA adapter (and gradient checkpointing when set) under autocast to ``compute`` (None: none),
    over image tokens and ``text_tokens`` text tokens, fp32 logits
    over every position, the cross-entropy loss, and backward."""
    from torch import nn

    from llava_ft.train import add_lora

    batch = cfg.train.batch_size
    tokens = image_tokens(llava_meta) + text_tokens
    vision = llava_meta.config.vision_config
    hidden = llava_meta.config.text_config.hidden_size
    vocab = llava_meta.config.text_config.vocab_size
    largest_linear = max(m.weight.numel() for m in llava_meta.modules() if isinstance(m, nn.Linear))
    model = add_lora(llava_meta, cfg.lora)  # on the meta device: peft moves fresh adapters next to the base
    with fake_tensors():
        model = materialise(model, dtype)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base = model.base_model.model

        def run() -> None:
            pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, dtype=dtype)
            embeddings = torch.randn(batch, tokens, hidden, dtype=dtype, requires_grad=True)  # (B, T, H)
            labels = torch.randint(0, vocab, (batch, tokens))  # (B, T)
            with torch.autocast(TRACED_DEVICE, dtype=compute, enabled=compute is not None):
                with torch.no_grad():
                    base.model.vision_tower(pixels, output_hidden_states=True)
                hidden_states = base.model.language_model(inputs_embeds=embeddings).last_hidden_state
                logits = base.lm_head(hidden_states).float()  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()

        model.train()
        peak = traced_peak(run, model)
    # nf4 Linears dequantise their weight to the compute dtype in forward and again in backward.
    return peak + (largest_linear * compute.itemsize if cfg.load_in_4bit else 0)


# --------------------------------------------------------------------------------------------
# Stable Diffusion + context layers
# --------------------------------------------------------------------------------------------


def story_unet(
    unet_meta: nn.Module,
    cfg: GeneratorConfig,
    text_dim: int,
    dtype: torch.dtype,
    layers_dtype: torch.dtype | None = None,
):
    """The UNet (``dtype``) with the story processors and context layers (``layers_dtype``, default
    ``dtype``) installed, as fake tensors."""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from storygen_ft.attention import build_context_layers, install_story_processors

    with unset_fake_temporarily(), init_empty_weights():  # real meta tensors, cast by materialise
        layers_meta = build_context_layers(unet_meta, cfg.context, text_dim)
    unet, layers = materialise(unet_meta, dtype), materialise(layers_meta, layers_dtype or dtype)
    install_story_processors(unet, layers, cfg.context)
    return unet, layers


def sd_generate_activations(
    sd_meta: tuple[nn.Module, nn.Module, nn.Module], cfg: GeneratorConfig, dtype: torch.dtype
) -> int:
    """One frame's peak, ``max_references`` references, the three guidance branches."""
    from storygen_ft.attention import StoryAttentionState

    unet_meta, vae_meta, text_meta = sd_meta
    count, side = cfg.max_references, cfg.resolution
    latent_side = side // 2 ** (len(vae_meta.config.block_out_channels) - 1)
    channels = unet_meta.config.in_channels
    text_dim, text_len = text_meta.config.hidden_size, text_meta.config.max_position_embeddings
    with fake_tensors(), torch.no_grad():
        unet, layers = story_unet(unet_meta, cfg, text_dim, dtype)
        vae, text_encoder = materialise(vae_meta, dtype), materialise(text_meta, dtype)

        def record(batch: int) -> dict[str, torch.Tensor]:
            latents = torch.randn(batch, channels, latent_side, latent_side, dtype=dtype)
            text = torch.randn(batch, text_len, text_dim, dtype=dtype)
            state = StoryAttentionState(mode="record")
            unet(latents, torch.zeros(batch, dtype=torch.long), text, cross_attention_kwargs={"story": state})
            return {layer: tokens.unsqueeze(0) for layer, tokens in state.features.items()}  # (1, N, L, C)

        def run() -> None:
            text_encoder(torch.zeros(2 + 2 * count, text_len, dtype=torch.long))  # prompt, empty, references
            pixels = torch.randn(2 * count, 3, side, side, dtype=dtype)  # references and blank images
            vae.encode(pixels).latent_dist.mode()
            del pixels
            # The blank set (a first frame's blank pass; later frames read it kept) and the real set, which
            # the image and all branches share.
            branches = [record(count), record(count)]
            features = {layer: torch.cat([b[layer] for b in branches]) for layer in branches[0]}
            del branches
            state = StoryAttentionState(
                mode="attend",
                features=features,  # (2, N, L, C)
                reference_mask=None,  # as the generator passes: every reference exists
                query_embedding=torch.randn(3, text_dim, dtype=dtype),
                key_embeddings=torch.randn(2, count, text_dim, dtype=dtype),
                set_of_row=(0, 1, 1),  # uncond reads the blank set; image and all the real one
                keep_projections=cfg.reference_features == "once",  # fast mode keeps them for the frame
            )
            latents = torch.randn(3, channels, latent_side, latent_side, dtype=dtype)  # (3, C, h, w)
            text = torch.randn(3, text_len, text_dim, dtype=dtype)
            unet(latents, torch.zeros(3, dtype=torch.long), text, cross_attention_kwargs={"story": state})
            del state, features
            vae.decode(torch.randn(1, channels, latent_side, latent_side, dtype=dtype))

        return traced_peak(run, unet, layers, vae, text_encoder)


def sd_train_activations(
    sd_meta: tuple[nn.Module, nn.Module, nn.Module],
    scheduler: object,
    cfg: GeneratorConfig,
    frozen: torch.dtype,
    compute: torch.dtype | None,
) -> int:
    """One training step at ``generator.train.batch_size`` with ``max_references`` references each: the
    batch's encoding (``storygen_ft.train.make_batch``: VAE and text encoder on targets and references,
    no grad), then ``StoryDiffusion.forward`` (the reference record pass, the UNet with context layers and
    gradient checkpointing when set, under autocast to ``compute``) and backward. Frozen parts are
    ``frozen``; the context layers train in fp32."""
    from storygen_ft.model import TEXT_MAX_LENGTH, StoryDiffusion

    unet_meta, vae_meta, text_meta = sd_meta
    batch, count, side = cfg.train.batch_size, cfg.max_references, cfg.resolution
    latent_side = side // 2 ** (len(vae_meta.config.block_out_channels) - 1)
    channels = unet_meta.config.in_channels
    text_dim = text_meta.config.hidden_size
    with fake_tensors():
        unet, layers = story_unet(unet_meta, cfg, text_dim, frozen, layers_dtype=torch.float32)
        vae, text_encoder = materialise(vae_meta, frozen), materialise(text_meta, frozen)
        model = StoryDiffusion(vae, text_encoder, None, unet, scheduler, cfg.context, context_layers=layers)
        model.requires_grad_(False)
        layers.requires_grad_(True)  # as storygen_ft.train: only the context layers train
        if cfg.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        model.train()

        def run() -> None:
            with torch.no_grad():  # make_batch
                pixels = torch.randn(batch * (1 + count), 3, side, side, dtype=frozen)  # targets, references
                vae.encode(pixels).latent_dist.sample()
                del pixels
                text_encoder(torch.zeros(batch * (1 + count), TEXT_MAX_LENGTH, dtype=torch.long))

            def latents(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, channels, latent_side, latent_side, dtype=frozen)

            inputs = {
                "latents": latents(batch), "noise": latents(batch),
                "ref_latents": latents(batch, count), "ref_noise": latents(batch, count),
                "text": torch.randn(batch, TEXT_MAX_LENGTH, text_dim, dtype=frozen),
                "pooled": torch.randn(batch, text_dim, dtype=frozen),
                "ref_text": torch.randn(batch, count, TEXT_MAX_LENGTH, text_dim, dtype=frozen),
                "ref_pooled": torch.randn(batch, count, text_dim, dtype=frozen),
                "ref_mask": torch.ones(batch, count, dtype=torch.bool),
                "timesteps": torch.zeros(batch, dtype=torch.long),
            }  # fmt: skip
            with torch.autocast(TRACED_DEVICE, dtype=compute, enabled=compute is not None):
                loss = model(**inputs, reference_timestep_divisor=cfg.reference_timestep_divisor)
            loss.backward()

        return traced_peak(run, unet, layers, vae, text_encoder)
