"""`roe train-builtin`: train the built-in OLMoE family on the generated task suite.

Trained the way real MoEs are: a load-balancing auxiliary loss (router_aux_loss_coef),
16 fine-grained experts with top-4 routing, and enough steps for the routers to settle,
so that sampled expert combinations are ones the model has met (RoE's premise).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path

import torch

from .builtin import BUILTIN_DIR, CHAT_TEMPLATE, SIZES

# name -> OlmoeConfig fields. Parameter counts (all experts): s ~1.5M, m ~3.9M, l ~7.4M.
MODEL_SIZES = {
    "s": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64),
    "m": dict(hidden_size=160, num_hidden_layers=5, num_attention_heads=5, intermediate_size=80),
    "l": dict(hidden_size=224, num_hidden_layers=6, num_attention_heads=7, intermediate_size=88),
}
COMMON = dict(num_experts=16, num_experts_per_tok=4, norm_topk_prob=False, router_aux_loss_coef=0.01,
              max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
VOCAB = 1024
SEQ = 256
SPECIALS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(path: Path, docs: int = 20000, seed: int = 0):
    """A byte-level BPE trained on the training stream; digits stay single tokens (arithmetic needs them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tasks import training_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(itertools.islice(training_documents(seed), docs), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], bos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1], model_max_length=COMMON["max_position_embeddings"])
    fast.save_pretrained(path)
    return fast


def batches(tokenizer, batch: int, seed: int):
    """Packed [batch, SEQ] blocks of the document stream, each document followed by EOS."""
    from .tasks import training_documents

    docs = training_documents(seed)
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    while True:
        while len(buf) < batch * SEQ:
            texts = list(itertools.islice(docs, 256))
            for ids in tokenizer(texts)["input_ids"]:
                buf += ids + [eos]
        block, buf = buf[: batch * SEQ], buf[batch * SEQ :]
        yield torch.tensor(block).view(batch, SEQ)


def validation_loss(model, tokenizer, device, n: int = 300) -> float:
    from .tasks import TASKS, examples

    eos = tokenizer.eos_token_id
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for task, mod in TASKS.items():
            for ex in examples(task, "validation", n // 3):
                ids = torch.tensor([tokenizer(mod.document(ex))["input_ids"] + [eos]], device=device)
                out = model(ids, labels=ids)
                total += float(out.loss) * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    model.train()
    return total / count


def train(size: str, steps: int, batch: int, lr: float, seed: int, device: str, out_dir: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .progress import progress
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = out_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if (tok_dir / "tokenizer.json").exists() else train_tokenizer(tok_dir)
    config = OlmoeConfig(vocab_size=len(tokenizer), **COMMON, **MODEL_SIZES[size], output_router_logits=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = OlmoeForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    log = {"size": size, "parameters": params, "steps": steps, "batch": batch, "seq": SEQ, "lr": lr, "seed": seed,
           "device": str(device), "tokens": steps * batch * SEQ, "loss": [], "aux_loss": []}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if str(device).startswith("cuda") else torch.autocast("cpu", enabled=False)
    start = time.time()
    data = batches(tokenizer, batch, seed)
    model.train()
    bar = progress(total=steps, desc=f"train {size} ({params / 1e6:.1f}M)")
    for step in range(steps):
        ids = next(data).to(device)
        with autocast:
            out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            lm = float(out.loss - config.router_aux_loss_coef * out.aux_loss)
            log["loss"].append([step, lm])
            log["aux_loss"].append([step, float(out.aux_loss)])
            bar.set_postfix(loss=f"{lm:.3f}")
        bar.update(1)
    bar.close()
    log["train_seconds"] = round(time.time() - start, 1)
    log["final_train_loss"] = log["loss"][-1][1]
    model.config.output_router_logits = False
    log["validation_loss"] = validation_loss(model, tokenizer, device)

    dest = out_dir / size
    model.to(torch.bfloat16).save_pretrained(dest)  # 16-bit on disk; loaded back in float32
    tokenizer.chat_template = CHAT_TEMPLATE  # vLLM's server needs one to chat
    tokenizer.save_pretrained(dest)
    (dest / "training_log.json").write_text(json.dumps(log, indent=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*log["loss"]), label="LM loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_yscale("log")
    ax.set_title(f"builtin:{size} ({params / 1e6:.1f}M params, {log['train_seconds']:.0f}s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest / "loss_curve.png", dpi=100)
    return log


def cmd_train(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for size in args.size.split(","):
        log = train(size, args.steps, args.batch, args.lr, args.seed, device, Path(args.out))
        print(json.dumps({k: v for k, v in log.items() if k not in ("loss", "aux_loss")}))
    return 0


def add_parser(sub) -> None:
    from .parsers import add_train

    add_train(sub)

