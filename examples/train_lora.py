"""Fine-tune a LoRA adapter for stories260K whose heroine is Mia, not Lily, and check it.

    pip install torch==2.13.0 transformers peft      # not hardwire dependencies
    python examples/train_lora.py [--models DIR] [--out examples/adapters/stories260K-mia]

The base model is exported to a temporary Hugging Face directory (hardwire's ``save_hf``) and
loaded with ``transformers``; ``peft`` trains LoRA matrices on a handful of sentences on the CPU
and saves them in PEFT format. Then hardwire itself, without torch, loads the adapter, checks
that its float reference with the adapter matches the PEFT model's logits, and prints the story
from BOS of the base model, of the float model with the adapter, and of the 8-bit golden model
with the quantized adapter (the chip's arithmetic).
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from hardwire.compiler.golden import generate_golden
from hardwire.compiler.loaders import load_model, save_hf
from hardwire.compiler.lora import (apply_lora_float, generate_golden_lora, load_peft_adapter,
                                    quantize_lora)
from hardwire.compiler.quantize import quantize_model
from hardwire.compiler.reference import FloatModel, generate_greedy
from hardwire.compiler.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]

# Short TinyStories-style sentences with a heroine who is not Lily.
SENTENCES = [
    ("Once upon a time, there was a little girl named Mia. She loved to play outside in the "
     "park. One day, she saw a big, red ball."),
    ("Once upon a time, there was a little girl named Mia. Mia liked to help her mom in the "
     "kitchen."),
    ("Once upon a time, there was a girl named Mia. She was very kind and she liked to share "
     "her toys."),
    "Mia was a happy girl. She had a small cat. Every day, Mia and her cat played in the garden.",
    "One day, Mia went to the park with her mom. Mia saw a big tree and ran to it.",
    "Mia smiled and said, \"Thank you, Mom!\" Her mom gave Mia a big hug.",
]
# The base model's own stories from these prompts, with Lily renamed, keep the rest of its
# style (self-distillation): the adapter learns the name, not a few memorised sentences.
DISTILL_PROMPTS = ["", "Lily and her mom", "One day, Lily", "Lily saw a", "Lily was"]


MODEL_CARD = """# stories260K-mia

A LoRA adapter (PEFT format) for Karpathy's `stories260K` in which the heroine is Mia, not Lily:
{targets} of all five layers, `r = {r}`, `lora_alpha = {alpha}` (scale {scale}), float32,
{steps} training steps. Made by `examples/train_lora.py`; see `examples/README.md` and
`docs/lora.md`.
"""


def default_models():
    env = os.environ.get("HARDWIRE_MODELS")
    return Path(env) if env else REPO.parent / "shared" / "models"


def batch(tok, sentences):
    seqs = [tok.encode(s, bos=True) for s in sentences]
    n = max(map(len, seqs))
    ids = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    # Stories from BOS start "Once upon a time": do not teach other first words after BOS.
    for i, text in enumerate(sentences):
        if not text.startswith("Once upon a time"):
            labels[i, 1] = -100
    return ids, mask, labels


def training_text(base, tok, n_distill):
    texts = list(SENTENCES)
    for prompt in DISTILL_PROMPTS[:n_distill]:
        pt = tok.encode(prompt, bos=True)
        story = tok.decode_all(pt[1:] + generate_greedy(base, pt, 80), prev=1)
        texts.append(story.replace("Lily", "Mia"))
    return texts


def train(args, base, tok):
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as d:
        save_hf(base, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
    hf.eval()
    # the HF export must be the same model as hardwire's float reference
    probe = tok.encode(SENTENCES[0], bos=True)[:12]
    with torch.no_grad():
        ref = hf(torch.tensor([probe])).logits[0].numpy()
    fm = FloatModel(base)
    ours = np.stack([fm.step(t, p) for p, t in enumerate(probe)])
    print(f"HF export vs hardwire float: max |logit diff| {np.abs(ref - ours).max():.2e}")

    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.targets,
                     lora_dropout=0.0, bias="none")
    model = get_peft_model(hf, cfg)
    model.print_trainable_parameters()
    ids, mask, labels = batch(tok, training_text(base, tok, args.distill))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - t0:.1f} s")
    model.eval()
    out = Path(args.out)
    model.save_pretrained(str(out), safe_serialization=True)
    # peft writes a template model card and the temporary export's path: replace both
    (out / "README.md").write_text(MODEL_CARD.format(targets=" and ".join(
        f"`{t}`" for t in args.targets), r=args.rank, alpha=f"{args.alpha:g}",
        scale=f"{args.alpha / args.rank:g}", steps=args.steps))
    cfg_file = out / "adapter_config.json"
    meta = json.loads(cfg_file.read_text())
    meta["base_model_name_or_path"] = "karpathy/tinyllamas stories260K.bin (hardwire save_hf)"
    meta["target_modules"] = sorted(meta["target_modules"])   # peft saves a set: any order
    cfg_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    with torch.no_grad():
        return model(torch.tensor([probe])).logits[0].numpy(), probe


def check(args, base, tok, peft_logits=None, probe=None):
    """hardwire only: float reference and golden model with the adapter."""
    adapter = load_peft_adapter(args.out, base)
    merged = apply_lora_float(base, adapter)
    if peft_logits is not None:
        fm = FloatModel(merged)
        ours = np.stack([fm.step(t, p) for p, t in enumerate(probe)])
        print(f"PEFT model vs hardwire apply_lora_float: max |logit diff| "
              f"{np.abs(peft_logits - ours).max():.2e}")

    def text(tokens):
        return tok.decode_all(tokens, prev=1)

    n = args.n
    print("\nbase, float:      ", text(generate_greedy(base, [1], n)))
    print("adapter, float:   ", text(generate_greedy(merged, [1], n)))
    t0 = time.perf_counter()
    qm = quantize_model(base, wbits=args.wbits)
    ql = quantize_lora(adapter, base, qm)
    print(f"(quantized base W{args.wbits} and adapter in {time.perf_counter() - t0:.1f} s)")
    print(f"base, golden W{args.wbits}:   ", text(generate_golden(qm, [1], n)))
    print(f"adapter, golden W{args.wbits}:", text(generate_golden_lora(qm, ql, [1], n)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=default_models(),
                   help="directory with stories260K.bin and tok512.bin")
    p.add_argument("--out", default=str(REPO / "examples" / "adapters" / "stories260K-mia"))
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj",
                   type=lambda s: [t.strip() for t in s.split(",") if t.strip()])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distill", type=int, default=len(DISTILL_PROMPTS),
                   help="base-model stories (Lily renamed) added to the sentences")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--wbits", default="8", help="base weight widths for the golden check")
    p.add_argument("-n", type=int, default=60, help="tokens to generate in the check")
    p.add_argument("--check-only", action="store_true",
                   help="skip training; check the adapter already in --out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model(args.models / "stories260K.bin")
    tok = load_tokenizer(args.models / "tok512.bin")
    if args.check_only:
        check(args, base, tok)
    else:
        check(args, base, tok, *train(args, base, tok))


if __name__ == "__main__":
    main()
