"""Sample generations at the end of a run: a few records of the eval set (else
the training set), their prompt (the conversation before its last assistant
turn, or the plain prompt) answered greedily by the trained model, printed
next to the answer in the data."""

from __future__ import annotations

import torch


def pick(records, n: int) -> list[dict]:
    """Up to n {prompt messages or text, reference} from canonical records (moetune.train.formats)."""
    out = []
    for r in records:
        if len(out) >= n:
            break
        rec = r.rec
        if "messages" in rec:
            msgs = rec["messages"]
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0:
                continue
            out.append({"where": r.where, "messages": msgs[:last], "reference": msgs[last]["content"]})
        elif "prompt" in rec:
            out.append({"where": r.where, "prompt": rec["prompt"], "reference": rec["completion"]})
    return out


@torch.no_grad()
def generate_for(model, tok, picks: list[dict], cfg, device) -> list[dict]:
    """[{where, prompt, reference, generated}] (greedy, max_new_tokens)."""
    if not picks or cfg.sample_records <= 0:
        return []
    was = model.training
    model.eval()
    out = []
    try:
        for p in picks[: cfg.sample_records]:
            if "messages" in p:
                if getattr(tok, "chat_template", None) is None:
                    continue
                ids = tok.apply_chat_template(
                    p["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
                )["input_ids"]
                shown = p["messages"][-1]["content"]
            else:
                ids = tok(p["prompt"])["input_ids"]
                shown = p["prompt"]
            x = torch.tensor([ids], device=device)
            y = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            gen = tok.decode(y[0, x.shape[1] :], skip_special_tokens=True).strip()
            out.append({"where": p["where"], "prompt": shown, "reference": p["reference"], "generated": gen})
    finally:
        model.train(was)
    return out
