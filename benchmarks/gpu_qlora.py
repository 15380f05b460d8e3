"""GPU check: QLoRA on a randomly initialised model shaped like Llama-3.1-8B.

Builds the model directly in NF4 on the GPU (no 16 GB checkpoint on disk), applies the
appliance's LoRA settings (r=16, alpha=32, all linear layers, gradient checkpointing as
on CUDA), and trains 30 steps of 2048 packed tokens with the appliance's own step
function. Reports peak VRAM and trained tokens per second. Target: under 8 GiB peak.

    python benchmarks/gpu_qlora.py                  # on a CUDA machine
    python benchmarks/gpu_qlora.py --smoke          # tiny shape, 3 steps: on the CPU without CUDA

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import appliance  # noqa: F401  (offline environment first)

SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32000,
    ),
}
TARGET_GIB = 8.0


def build_nf4_model(shape: str, device: str):
    """A LlamaForCausalLM whose linear layers are bitsandbytes NF4, quantized as they are
    moved to the device, layer by layer (never the whole bf16 model in memory at once)."""
    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(max_position_embeddings=8192, tie_word_embeddings=False, **SHAPES[shape])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    quant_type="nf4",
                    compress_statistics=True,
                    device="meta",
                )
                weight = torch.randn(child.out_features, child.in_features, dtype=torch.bfloat16) * 0.02
                layer.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, quant_type="nf4", compress_statistics=True
                ).to(device)
                setattr(module, child_name, layer)
    # Embeddings, norms and the output layer stay in bf16, as in QLoRA.
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype != torch.uint8:
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0, 0.02)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # to_empty leaves its buffer unset
    return model


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.training.render import IGNORE, Example
    from appliance.training.train import TrainState, prepare_qlora, train_step

    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--device", help="cuda (the default), or cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the same code path at a tiny size: tiny shape, 3 steps of 256 tokens, "
        "on the CPU unless a CUDA device is there",
    )
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.steps, args.tokens = "tiny", 3, 256  # step 3 is the one timed step
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = args.device or "cuda"

    torch.manual_seed(0)
    model = build_nf4_model(args.shape, args.device)
    model = prepare_qlora(model, args.device)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    rng = random.Random(0)
    vocab = model.config.vocab_size

    def step_examples() -> list[Example]:
        """Packed to exactly --tokens: examples of random lengths, loss on their second half."""
        out, used = [], 0
        while used < args.tokens:
            n = min(args.tokens - used, rng.randint(64, 1024))
            ids = [rng.randrange(vocab) for _ in range(n)]
            out.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2 :]))
            used += n
        return out

    state = TrainState("gpu", "gpu", args.steps, micro_tokens=args.tokens)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    tokens, seconds, losses = 0, 0.0, []
    for step in range(args.steps):
        batch = step_examples()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(train_step(model, batch, state, args.device, lambda e: None))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # the first steps include kernel selection and allocator warm-up
            seconds += time.perf_counter() - t0
            tokens += sum(len(e.input_ids) for e in batch)
        print(f"step {step + 1}/{args.steps} loss {losses[-1]:.3f}", flush=True)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    print(
        json.dumps(
            {
                "name": "gpu_qlora",
                "shape": args.shape,
                "tokens_per_step": args.tokens,
                "steps": args.steps,
                "peak_vram_gib": round(peak_gib, 2) if peak_gib is not None else None,
                "target_gib": TARGET_GIB,
                "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                "pass": peak_gib is not None and peak_gib < TARGET_GIB,
            }
        )
    )


if __name__ == "__main__":
    main()
