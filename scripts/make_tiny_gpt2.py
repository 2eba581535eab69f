"""Build ``assets/tiny-gpt2``: a tiny GPT-2 and its tokenizer, trained on synthetic reviews.

Real checkpoints cannot be downloaded on the machines this project runs on, so polyrl ships its own
tiny language model, saved in the real transformers format (``config.json``,
``model.safetensors``, ``tokenizer.json``...) so that the same loading code serves a Hub model.

The script is reproducible (seeded) and runs on a CPU in a few minutes:

1. generates a corpus of short product and movie reviews from templates and word lists. Reviews
   open with a neutral clause ("This movie was", "I bought this blender and") and go on positive,
   negative or mixed, so a continuation of an opening can go either way: a sentiment reward has
   something to learn;
2. trains a byte-level BPE tokenizer on it with ``tokenizers`` (GPT-2 style, ``<|endoftext|>`` as
   bos/eos/unk and pad);
3. trains a small ``GPT2LMHeadModel`` on ``review <|endoftext|>`` sequences (no BOS, as prompts
   are fed at sampling time) so that it learns to end a review with EOS;
4. saves model, tokenizer, ``prompts.txt`` (openings of held-out reviews) and
   ``training_log.txt`` (this script's output) into the output folder.

Usage::

    python scripts/make_tiny_gpt2.py [--out assets/tiny-gpt2] [--steps 900]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
EOS = "<|endoftext|>"

# ------------------------------------------------------------------------------ word lists
MOVIES = ["movie", "film", "documentary", "comedy", "thriller", "drama", "sequel", "cartoon",
          "horror movie", "musical", "western", "romance", "mystery", "show", "series"]
MOVIE_ASPECTS = ["acting", "plot", "story", "ending", "soundtrack", "dialogue", "cast", "script",
                 "pacing", "music", "humor", "special effects", "camera work", "lead actor",
                 "final scene", "villain"]
PRODUCTS = ["blender", "toaster", "vacuum", "kettle", "coffee maker", "backpack", "lamp",
            "keyboard", "mouse", "charger", "water bottle", "speaker", "camera", "chair", "pillow",
            "phone case", "headset", "microwave", "fan", "watch", "tent", "jacket", "printer"]
PRODUCT_ASPECTS = ["battery", "price", "design", "sound", "handle", "lid", "motor", "cable",
                   "color", "size", "instructions", "customer service", "shipping", "packaging",
                   "build quality", "button", "screen", "material"]
PEOPLE = ["wife", "husband", "son", "daughter", "sister", "brother", "mother", "father", "friend",
          "roommate", "kids", "family", "partner", "boss"]
WHEN = ["last night", "yesterday", "last week", "over the weekend", "on a rainy day",
        "on Friday", "with friends", "at the theater", "at home", "on a long flight"]
DURATIONS = ["two weeks", "a month", "three months", "a year", "a few days", "six months",
             "two years", "a week"]

ADJ = {
    "pos": ["great", "excellent", "wonderful", "amazing", "fantastic", "brilliant", "beautiful",
            "lovely", "superb", "perfect", "enjoyable", "fun", "solid", "impressive",
            "delightful", "good", "nice", "charming", "clever", "sweet", "awesome", "fine"],
    "neg": ["terrible", "awful", "boring", "horrible", "bad", "disappointing", "poor", "dull",
            "weak", "cheap", "useless", "annoying", "painful", "stupid", "ugly", "sad",
            "worthless", "pathetic", "lousy", "bland", "dreadful", "flimsy"],
    "neu": ["okay", "average", "simple", "long", "short", "predictable", "loud", "quiet", "small",
            "heavy", "standard", "typical", "different", "ordinary", "plain", "light"],
}
INTENS = ["", "", "", "really ", "very ", "quite ", "so ", "pretty ", "truly ", "absolutely "]
MOVIE_VERB = {
    "pos": ["loved", "enjoyed", "adored", "liked", "appreciated", "laughed through"],
    "neg": ["hated", "regretted", "could not stand", "disliked", "fell asleep during", "walked out of"],
    "neu": ["watched", "finished", "saw", "sat through"],
}
PRODUCT_CLAUSE = {
    "pos": ["it works great", "it works perfectly", "it has been wonderful", "I love it",
            "it is worth every penny", "it does exactly what I wanted", "it is a great value",
            "I am very happy with it", "it has made my life easier", "it still works like new"],
    "neg": ["it broke after a week", "it stopped working", "it is a waste of money",
            "I hate it", "it fell apart", "it was broken out of the box", "I regret buying it",
            "it is a total disappointment", "it never worked right", "I am very unhappy with it"],
    "neu": ["it does the job", "it is what it is", "it works as described", "it arrived on time",
            "it is about what I expected", "it looks like the picture"],
}
MOVIE_CLAUSE = {
    "pos": ["it was a joy to watch", "it made me smile", "I loved every minute",
            "it is one of the best I have seen", "the whole family enjoyed it",
            "it was worth the ticket", "it kept me hooked until the end", "I laughed out loud"],
    "neg": ["it was a waste of time", "I wanted my money back", "it put me to sleep",
            "it is one of the worst I have seen", "nobody in the room enjoyed it",
            "it was painful to sit through", "I was bored the whole time", "it made me angry"],
    "neu": ["it was about two hours long", "it was what I expected", "I watched it once",
            "it was in English", "it had a lot of scenes"],
}
CLOSING = {
    "pos": ["Highly recommended.", "I would buy it again.", "Five stars.", "I recommend it to everyone.",
            "Great job!", "Love it!", "Totally worth it.", "I will watch it again.", "Thank you!"],
    "neg": ["Avoid it.", "Do not buy this.", "One star.", "Not recommended.", "What a mess.",
            "Never again.", "Save your money.", "Skip it.", "Very disappointed."],
    "neu": ["That is all.", "Three stars.", "It is fine I guess.", "Your call.", "We will see."],
}
BUT = {"pos": ["However,", "But", "Still,", "On the other hand,"], "neg": ["However,", "But", "Sadly,", "Then again,"]}


LOG: list[str] = []


def log(*parts: object) -> None:
    """Print, and keep the line for ``training_log.txt`` in the output folder."""
    line = " ".join(str(p) for p in parts)
    LOG.append(line)
    print(line, flush=True)


def pick(rng: random.Random, xs: list[str]) -> str:
    return xs[rng.randrange(len(xs))]


def adj(rng: random.Random, s: str) -> str:
    """An adjective of sentiment ``s`` with an optional intensifier."""
    return pick(rng, INTENS if s != "neu" else [""]) + pick(rng, ADJ[s])


def an(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def movie_opening(rng: random.Random, s: str) -> tuple[str, str]:
    """(neutral opening, rest of the first sentence of sentiment ``s``)."""
    m = pick(rng, MOVIES)
    k = rng.randrange(7)
    if k == 0:
        return f"This {m} was", f" {adj(rng, s)}."
    if k == 1:
        return f"I watched this {m} {pick(rng, WHEN)} and", f" {pick(rng, MOVIE_CLAUSE[s])}."
    if k == 2:
        return (f"My {pick(rng, PEOPLE)} and I saw this {m} {pick(rng, WHEN)}.",
                f" We {pick(rng, MOVIE_VERB[s])} it.")
    if k == 3:
        return f"The {pick(rng, MOVIE_ASPECTS)} in this {m} was", f" {adj(rng, s)}."
    if k == 4:
        return f"I went to see this {m} and", f" I {pick(rng, MOVIE_VERB[s])} it."
    if k == 5:
        return f"Honestly, this {m} is", f" {adj(rng, s)}."
    return f"I have to say that this {m}", f" was {adj(rng, s)}."


def product_opening(rng: random.Random, s: str) -> tuple[str, str]:
    p = pick(rng, PRODUCTS)
    k = rng.randrange(7)
    if k == 0:
        return f"I bought this {p} and", f" {pick(rng, PRODUCT_CLAUSE[s])}."
    if k == 1:
        return f"This {p} is", f" {adj(rng, s)}."
    if k == 2:
        return f"I have been using this {p} for {pick(rng, DURATIONS)} and", f" {pick(rng, PRODUCT_CLAUSE[s])}."
    if k == 3:
        return f"The {pick(rng, PRODUCT_ASPECTS)} on this {p} is", f" {adj(rng, s)}."
    if k == 4:
        return f"I ordered this {p} for my {pick(rng, PEOPLE)} and", f" {pick(rng, PRODUCT_CLAUSE[s])}."
    if k == 5:
        return f"After {pick(rng, DURATIONS)} with this {p},", f" {pick(rng, PRODUCT_CLAUSE[s])}."
    return f"My new {p} arrived {pick(rng, WHEN)} and", f" {pick(rng, PRODUCT_CLAUSE[s])}."


def body_sentence(rng: random.Random, s: str, kind: str) -> str:
    if kind == "movie":
        k = rng.randrange(4)
        if k == 0:
            return f"The {pick(rng, MOVIE_ASPECTS)} was {adj(rng, s)}."
        if k == 1:
            return f"The {pick(rng, MOVIE_ASPECTS)} was {adj(rng, s)} and the {pick(rng, MOVIE_ASPECTS)} was {adj(rng, s)}."
        if k == 2:
            return f"I {pick(rng, MOVIE_VERB[s])} the {pick(rng, MOVIE_ASPECTS)}."
        return pick(rng, MOVIE_CLAUSE[s]).capitalize() + "."
    k = rng.randrange(4)
    if k == 0:
        return f"The {pick(rng, PRODUCT_ASPECTS)} is {adj(rng, s)}."
    if k == 1:
        return f"The {pick(rng, PRODUCT_ASPECTS)} is {adj(rng, s)} and the {pick(rng, PRODUCT_ASPECTS)} is {adj(rng, s)}."
    if k == 2:
        return f"It feels {adj(rng, s)}."
    return pick(rng, PRODUCT_CLAUSE[s]).capitalize() + "."


def review(rng: random.Random) -> tuple[str, str]:
    """One review, returned as (neutral opening, continuation)."""
    kind = "movie" if rng.random() < 0.5 else "product"
    s = rng.choices(["pos", "neg", "neu", "mixed"], weights=[4, 4, 1, 2])[0]
    first = s if s != "mixed" else pick(rng, ["pos", "neg"])
    opening, rest = (movie_opening if kind == "movie" else product_opening)(rng, first)
    sentences = []
    for _ in range(rng.randrange(3)):
        sentences.append(body_sentence(rng, first if rng.random() < 0.85 else "neu", kind))
    last = first
    if s == "mixed":
        last = "neg" if first == "pos" else "pos"
        b = body_sentence(rng, last, kind)
        sentences.append(f"{pick(rng, BUT[first])} {b[0].lower()}{b[1:]}")
    if rng.random() < 0.7:
        sentences.append(pick(rng, CLOSING[last]))
    return opening, rest + "".join(" " + t for t in sentences)


def make_corpus(n: int, n_prompts: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` training reviews and ``n_prompts`` distinct openings of held-out reviews."""
    rng = random.Random(seed)
    train = [o + r for o, r in (review(rng) for _ in range(n))]
    seen_train = set(train)
    prompts: list[str] = []
    while len(prompts) < n_prompts:
        o, r = review(rng)
        if o + r not in seen_train and o not in prompts:
            prompts.append(o)
    return train, prompts


# ------------------------------------------------------------------------------ tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Train a byte-level BPE and save it as a GPT-2 tokenizer; returns the transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        merges = [tuple(ln.split(" ")) for ln in (Path(tmp) / "merges.txt").read_text().splitlines()
                  if ln and not ln.startswith("#version")]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=EOS, bos_token=EOS, eos_token=EOS,
                            pad_token=EOS)
    tok.model_max_length = 128
    tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)  # what users will get
    assert tok.pad_token == EOS and tok.eos_token == EOS, (tok.pad_token, tok.eos_token)
    assert tok.decode(tok(texts[0])["input_ids"]) == texts[0]
    return tok


# ------------------------------------------------------------------------------ model
def train_model(tok, texts: list[str], args: argparse.Namespace):
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tok.eos_token_id
    ids = [tok(t)["input_ids"] + [eos] for t in texts]
    max_len = max(len(x) for x in ids)
    assert max_len <= args.n_positions, f"longest review has {max_len} tokens > n_positions"
    # hold out 5% of the reviews to report an honest perplexity
    n_val = max(64, len(ids) // 20)
    val, train = ids[:n_val], ids[n_val:]

    def batchify(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(s) for s in seqs)
        x = torch.full((len(seqs), L), eos, dtype=torch.long)
        y = torch.full((len(seqs), L), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
            y[i, : len(s)] = torch.tensor(s)
        return x, y

    config = GPT2Config(vocab_size=len(tok), n_positions=args.n_positions, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, bos_token_id=eos, eos_token_id=eos,
                        pad_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, vocab {len(tok)}, longest review {max_len} tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(args.seed + 1)

    @torch.no_grad()
    def evaluate(seqs: list[list[int]]) -> float:
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, len(seqs), 128):
            x, y = batchify(seqs[i : i + 128])
            out = model(input_ids=x, attention_mask=(y != -100).long(), labels=y)
            k = int((y[:, 1:] != -100).sum())
            tot, n = tot + out.loss.item() * k, n + k
        model.train()
        return tot / n

    start, ema = time.time(), None
    model.train()
    for step in range(1, args.steps + 1):
        # linear warm-up, then cosine decay to 10% (a fixed number of steps keeps the run reproducible)
        frac = step / args.steps
        lr = args.lr * min(1.0, step / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = batchify(rng.sample(train, args.batch_size))
        loss = model(input_ids=x, attention_mask=(y != -100).long(), labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0:
            log(f"step {step:5d}  {time.time() - start:6.1f}s  lr {lr:.2e}  train loss (EMA) {ema:.3f}")
    train_loss = evaluate(train[:2000])
    val_loss = evaluate(val)
    log(f"done after {args.steps} steps, {time.time() - start:.0f}s: "
          f"train loss {train_loss:.3f} (ppl {math.exp(train_loss):.2f}), "
          f"held-out loss {val_loss:.3f} (ppl {math.exp(val_loss):.2f})")
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "assets" / "tiny-gpt2"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-reviews", type=int, default=6000)
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--vocab-size", type=int, default=1200)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=900, help="optimizer steps (about 3 minutes on 2 cores)")
    args = ap.parse_args()

    t0 = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    final = Path(args.out)
    out = final.with_name(final.name + ".partial")  # built aside, swapped in at the end
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    texts, prompts = make_corpus(args.num_reviews, args.num_prompts, args.seed)
    log(f"corpus: {len(texts)} reviews, {len(set(texts))} distinct; e.g.")
    for t in texts[:4]:
        log("   ", t)
    tok = train_tokenizer(texts, args.vocab_size, out)
    model = train_model(tok, texts, args)
    model.save_pretrained(out, safe_serialization=True)
    model.generation_config.save_pretrained(out)
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")

    # a few samples from the held-out openings
    model.eval()
    g = torch.Generator().manual_seed(args.seed)
    log("samples:")
    for p in prompts[:6]:
        x = torch.tensor([tok(p)["input_ids"]])
        with torch.no_grad():
            for _ in range(32):
                logits = model(input_ids=x).logits[0, -1]
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)
                x = torch.cat([x, nxt[None]], dim=1)
                if nxt.item() == tok.eos_token_id:
                    break
        log("   ", repr(tok.decode(x[0], skip_special_tokens=True)))
    size = sum(f.stat().st_size for f in out.iterdir())
    log(f"wrote {final} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s")
    (out / "training_log.txt").write_text("\n".join(LOG) + "\n")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)


if __name__ == "__main__":
    main()
